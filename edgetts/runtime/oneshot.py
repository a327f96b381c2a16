"""Questions answered one after another: what ``edgetts run`` does, as a library call.

:class:`Answerer` opens the engine an engine spec names (or, with a Pareto config, the engine of
the point the policy picks for each question's deadline, energy limit and price), runs the
strategy with its n and budget under the deadline, and returns the trace.  With a config, an
explicit strategy, n or budget overrides the point's, as an expert request to ``edgetts serve``
does.  Engines stay open between questions (a config's points share them by spec); one that a
later question needs wider (more rows, a longer budget) is opened again at that size.
:func:`answer` is one question with the engine closed after it; :func:`answer_lines` answers a
stream of them (``edgetts run -``), where a mean budget per question can set the price
(:class:`~edgetts.runtime.pricing.MeanSpend`: the price rises while the recent answers cost more
than the budget, in latency or in the energy the device drew, and falls while they cost less).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edgetts.engines import EngineError, EngineSpec, open_engine
from edgetts.engines.base import SamplingParams
from edgetts.runtime.policy import Policy, Selection
from edgetts.strategies import STRATEGIES, RunConfig, StrategyError, Trace, create
from edgetts.timing import NO_DEADLINE_MS

DEFAULTS = {"strategy": "majority", "n": 8, "budget": 256}


@dataclass(frozen=True)
class Answer:
    trace: Trace
    spec: EngineSpec  # the engine that ran
    strategy: str
    n: int
    budget: int
    selection: Selection | None = None  # the policy's pick, with a config
    notes: tuple[str, ...] = ()  # one line each: settings that differ from the profile's, a failed check
    price: float = 0.0  # the price on compute the point was chosen under


class Answerer:
    """Answers questions with ``spec``'s engine or the points of ``config``; ``engine_defaults`` (threads,
    gpu_layers) apply where the engine takes them.

    With a config, the point's engine runs under the caller's settings, else this device's defaults
    (threads: all cores but one, as the profile measured; GPU layers: auto), never the settings the
    point was profiled with; where they differ, the first answer from that engine carries a note.
    """

    def __init__(self, spec: EngineSpec | None = None, config: str | None = None, strategy: str | None = None,
                 n: int | None = None, budget: int | None = None, temperature: float = 1.0, seed: int = 0,
                 raw_prompt: bool = False, family: str | None = None, memory_mb: float | None = None,
                 **engine_defaults):  # fmt: skip
        self.policy, self.notes = None, []
        if config is not None:
            from edgetts.engines.spec import serving_threads
            from edgetts.pareto.config import one_setting, runnable_strategies, validation_note

            self.policy = Policy.load(config)  # a missing or broken file is said first
            runnable_strategies(self.policy.config, config)
            one_setting(self.policy.config, config)
            engine_defaults["threads"] = engine_defaults.get("threads") or serving_threads()
            self.notes += [line for line in [validation_note(self.policy.config, config)] if line]
        elif spec is None:
            raise StrategyError("nothing to run: give an engine spec (a model) or a Pareto config")
        if strategy is not None and strategy not in STRATEGIES:
            raise StrategyError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        self.spec, self.strategy, self.n, self.budget = spec, strategy, n, budget
        self.temperature, self.seed, self.raw_prompt = temperature, seed, raw_prompt
        self.family, self.memory_mb, self.engine_defaults = family, memory_mb, engine_defaults
        self.engines: dict[str, tuple] = {}  # spec key -> (engine, family, rows, tokens)

    def check(self, deadline_ms: float | None, energy_j: float | None = None) -> None:
        """Refuse at once what would refuse every question: a config with no deadline, or a deadline no point
        meets (:class:`~edgetts.runtime.policy.DeadlineTooShort`)."""
        if self.policy is not None:
            if deadline_ms is None:
                raise StrategyError("a Pareto config needs a deadline: the policy picks the point that fits it")
            self.policy.check_deadline(deadline_ms, energy_j)

    def answer(self, question: str, deadline_ms: float | None = None, energy_j: float | None = None,
               price: float = 0.0, seed: int | None = None, charge=None) -> Answer:  # fmt: skip
        """Answer ``question`` (``seed``: the first row's sampling seed, default the answerer's); with a config,
        ``price`` weighs ``charge(point)`` (default: its predicted latency, :meth:`Policy.select`)."""
        if not question.strip():
            raise StrategyError("the question is empty")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line or standard input
            raise StrategyError("the question is not valid UTF-8 text") from None
        if "\0" in question:  # the C runtime's questions are C strings, which end there: refused by both alike
            raise StrategyError("the question holds a NUL character")
        spec, strategy, n, budget, selection, profiled = self.spec, self.strategy, self.n, self.budget, None, None
        if self.policy is not None:
            from edgetts.pareto.config import point_spec, profiled_with

            self.check(deadline_ms, energy_j)
            selection = self.policy.select(deadline_ms, energy_j=energy_j, price=price, charge=charge)
            p = selection.point
            spec, profiled = point_spec(p), profiled_with(p)
            strategy, n, budget = strategy or p["strategy"], n or p["n"], budget or p["budget"]
        strategy = strategy or DEFAULTS["strategy"]
        n, budget = n or DEFAULTS["n"], budget or DEFAULTS["budget"]
        if STRATEGIES[strategy].single_row:  # one row whatever n the point has, and said so (as serve does)
            n = 1
        if self.family:
            spec = EngineSpec(spec.engine, spec.artifact, spec.url, {**spec.options, "family": self.family})
        spec = spec.with_options(**self.engine_defaults)
        binding = deadline_ms if deadline_ms is None or deadline_ms < NO_DEADLINE_MS else None
        cfg = RunConfig(n=n, budget=budget, deadline_ms=binding, raw_prompt=self.raw_prompt,
                        sampling=SamplingParams(temperature=self.temperature,
                                                seed=self.seed if seed is None else seed))  # fmt: skip
        engine, fam, notes = self._engine(spec, n, budget + cfg.answer_tokens, selection, profiled)
        trace = create(strategy, engine, fam, cfg).run(question)
        return Answer(trace, spec.resolved(), strategy, n, budget, selection, tuple(notes), price)

    def _engine(self, spec: EngineSpec, rows: int, tokens: int, selection, profiled) -> tuple:
        """The open engine for ``spec`` with room for ``rows`` rows of ``tokens`` tokens, and the notes of
        its opening (the answerer's own notes go with the first answer)."""
        key = json.dumps(spec.to_dict(), sort_keys=True)
        known = self.engines.get(key)
        if known is not None and known[2] >= rows and known[3] >= tokens:
            return known[0], known[1], []
        if known is not None:  # too narrow for this question: open it again at the larger size
            known[0].close()
            rows, tokens = max(rows, known[2]), max(tokens, known[3])
        engine, fam = open_engine(spec, max_rows=rows, max_tokens=tokens, memory_mb=self.memory_mb)
        self.engines[key] = (engine, fam, rows, tokens)
        notes, self.notes = self.notes, []
        if selection is not None and known is None:
            from edgetts.engines.spec import settings_note
            from edgetts.telemetry.device import with_power_mode

            note = settings_note(selection.point["id"], profiled, with_power_mode(engine.settings()))
            notes += [note] if note else []
        return engine, fam, notes

    def close(self) -> None:
        for engine, *_ in self.engines.values():
            engine.close()
        self.engines = {}

    def __enter__(self) -> Answerer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def answer(question: str, spec: EngineSpec | None = None, config: str | None = None, strategy: str | None = None,
           n: int | None = None, budget: int | None = None, deadline_ms: float | None = None,
           energy_j: float | None = None, temperature: float = 1.0, seed: int = 0, raw_prompt: bool = False,
           family: str | None = None, memory_mb: float | None = None, price: float = 0.0,
           **engine_defaults) -> Answer:  # fmt: skip
    """Answer one ``question`` (:class:`Answerer`), the engine closed after it."""
    if not question.strip():
        raise StrategyError("the question is empty")
    with Answerer(spec, config, strategy, n, budget, temperature, seed, raw_prompt, family, memory_mb,
                  **engine_defaults) as answerer:  # fmt: skip
        return answerer.answer(question, deadline_ms, energy_j, price)


def answer_lines(answerer: Answerer, lines: Iterable[str], deadline_ms: float | None = None,
                 energy_j: float | None = None, price: float = 0.0,
                 spend=None) -> Iterator[tuple[int, Answer | str]]:  # fmt: skip
    """Answer each non-blank line of ``lines`` in turn, yielding (its line number, the :class:`Answer`, or why
    that question could not be answered); one bad question does not stop the others.  With ``spend`` (a
    :class:`~edgetts.runtime.pricing.MeanSpend`), each question is priced at what the answers before it
    left the price at, and its answer counts against the mean (its latency, or the energy drawn)."""
    answerer.check(deadline_ms, energy_j)
    for number, line in enumerate(lines, 1):
        question = line.rstrip("\r\n")
        if not question.strip():
            continue
        priced, charge = (spend.price, spend.charge()) if spend else (price, None)
        try:
            out = answerer.answer(question, deadline_ms, energy_j, priced, charge=charge)
        except (StrategyError, EngineError) as e:
            yield number, str(e)
            continue
        if spend is not None:
            spend.observe(1000 * out.trace.wall_s)
        yield number, out
