"""One question, one answer: what ``edgetts run`` does, as a library call.

:func:`answer` opens the engine an engine spec names (or, with a Pareto config, the engine of
the point the policy picks for the deadline and energy limit), runs the strategy with its n
and budget under the deadline, and returns the trace.  With a config, an explicit strategy, n
or budget overrides the point's, as an expert request to ``edgetts serve`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetts.engines import EngineSpec, open_engine
from edgetts.engines.base import SamplingParams
from edgetts.runtime.policy import Policy, Selection
from edgetts.strategies import STRATEGIES, RunConfig, StrategyError, Trace, create

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


def answer(question: str, spec: EngineSpec | None = None, config: str | None = None, strategy: str | None = None,
           n: int | None = None, budget: int | None = None, deadline_ms: float | None = None,
           energy_j: float | None = None, temperature: float = 1.0, seed: int = 0, raw_prompt: bool = False,
           family: str | None = None, memory_mb: float | None = None, price: float = 0.0,
           **engine_defaults) -> Answer:  # fmt: skip
    """Answer ``question``; ``engine_defaults`` (threads, gpu_layers) apply where the engine takes them.

    With a config, the point's engine runs under the caller's settings, else this device's defaults
    (threads: all cores but one, as the profile measured; GPU layers: auto), never the settings the
    point was profiled with; where they differ, a note says so.
    """
    if not question.strip():
        raise StrategyError("the question is empty")
    selection, notes, profiled = None, [], None
    if config is not None:
        from edgetts.engines.spec import serving_threads
        from edgetts.pareto.config import one_setting, point_spec, profiled_with, validation_note

        policy = Policy.load(config)  # a missing or broken file is said first
        one_setting(policy.config, config)
        if deadline_ms is None:
            raise StrategyError("a Pareto config needs a deadline: the policy picks the point that fits it")
        policy.check_deadline(deadline_ms, energy_j)
        selection = policy.select(deadline_ms, energy_j=energy_j, price=price)
        p = selection.point
        spec, profiled = point_spec(p), profiled_with(p)
        engine_defaults["threads"] = engine_defaults.get("threads") or serving_threads()
        strategy, n, budget = strategy or p["strategy"], n or p["n"], budget or p["budget"]
        notes += [line for line in [validation_note(policy.config, config)] if line]
    if spec is None:
        raise StrategyError("nothing to run: give an engine spec (a model) or a Pareto config")
    strategy = strategy or DEFAULTS["strategy"]
    if strategy not in STRATEGIES:
        raise StrategyError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    n, budget = n or DEFAULTS["n"], budget or DEFAULTS["budget"]
    if family:
        spec = EngineSpec(spec.engine, spec.artifact, spec.url, {**spec.options, "family": family})
    spec = spec.with_options(**engine_defaults)
    cfg = RunConfig(n=n, budget=budget, deadline_ms=deadline_ms, raw_prompt=raw_prompt,
                    sampling=SamplingParams(temperature=temperature, seed=seed))  # fmt: skip
    rows = 1 if STRATEGIES[strategy].single_row else n
    engine, fam = open_engine(spec, max_rows=rows, max_tokens=budget + cfg.answer_tokens, memory_mb=memory_mb)
    if selection is not None:
        from edgetts.engines.spec import settings_note
        from edgetts.telemetry.device import with_power_mode

        note = settings_note(selection.point["id"], profiled, with_power_mode(engine.settings()))
        notes += [note] if note else []
    try:
        trace = create(strategy, engine, fam, cfg).run(question)
    finally:
        engine.close()
    return Answer(trace, spec.resolved(), strategy, n, budget, selection, tuple(notes))


