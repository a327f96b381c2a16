"""What every strategy shares: the run configuration, the trace record, and the budget controller.

A strategy is a controller over :meth:`Engine.sample` plus a pure aggregation
(:mod:`edgetts.strategies.aggregate`).  :class:`BudgetController` implements the parts they
all need, step by step over the live rows:

* **thinking budget**: a row that has sampled ``budget`` thinking tokens gets the family's
  end-of-thinking delimiter and answer prefix forced, plus ``answer_tokens`` of room;
* **answer budget**: a row stops ``answer_tokens`` after its reasoning ended;
* **deadline**: the controller keeps running estimates of one decode step (starting from the
  engine's, where it has one: a shared batch's round) and of the cost of one prompt token
  (from the prefill), and of the longest wait for the CPU beyond a step (or the engine's
  measure of its stalls).  Forcing the answer costs one decode of the forced text for every
  thinking row plus a few answer steps (``ANSWER_STEPS``, with ``ANSWER_SAFETY``) and one such
  wait; when the time left could no longer fit that, every thinking row is forced to answer
  now, a row that ends its thinking by itself with no time for an answer of its own gets the
  answer prefix at once, and when not even one more step fits, all rows stop.  So a call
  returns no later than the deadline plus one decode step, unless the prompt alone takes
  longer than the deadline.  On an engine that cannot step (rounds of server requests) the
  deadline is checked between rounds only.

Hooks let a strategy add its own rule (replace an early end of thinking with "Wait", stop
rows of low confidence, stop everything when the first row finishes).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

from edgetts.engines.base import Control, Engine, Row, SampleResult, SamplingParams
from edgetts.models.families import ChatTemplateRefused, Family, build_prompt
from edgetts.strategies.pooling import Estimate
from edgetts.tasks.grading import extract_answer
from edgetts.timing import ANSWER_SAFETY, ANSWER_STEPS


class StrategyError(ValueError):
    """A strategy that cannot run as asked (bad option, missing engine capability)."""


@dataclass(frozen=True)
class RunConfig:
    """How much compute one request may use."""

    n: int = 1
    budget: int = 256  # thinking tokens per row
    answer_tokens: int = 32  # room for the answer after the reasoning ends
    deadline_ms: float | None = None
    # Where a caller's deadline fixed the end (perf_counter s; a server's Deadline.end): the call's
    # controllers stop there exactly, and deadline_ms is the time that was left when it was made.
    ends_at: float | None = None
    # Past the deadline, time a row may still take to state its answer (a server's, from its reserve:
    # Deadline.grace_ms); 0 stops every row at the deadline.
    grace_ms: float = 0.0
    # The same for a call none of whose rows has finished (it would come back with no answer at all;
    # Deadline.rescue_ms); 0: the grace only.
    rescue_ms: float = 0.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    raw_prompt: bool = False  # ignore the model's chat template
    cancel: object = None  # a threading.Event: when set, every row stops at the next step
    messages: tuple | None = None  # a whole chat ({"role", "content"} dicts) whose last turn is the question
    # Tokens a row usually takes (the profile's figure): a shared batch judges a call's urgency by it.
    expected_tokens: float | None = None

    def __post_init__(self):
        if self.n < 1:
            raise StrategyError(f"n must be at least 1, got {self.n}")
        if self.budget < 1 or self.answer_tokens < 1:
            raise StrategyError("budget and answer_tokens must be at least 1")
        if self.deadline_ms is not None and self.deadline_ms <= 0:
            raise StrategyError(f"deadline_ms must be positive, got {self.deadline_ms}")


@dataclass
class RowTrace:
    thinking_tokens: int
    answer_tokens: int
    answer: str | None
    finish_reason: str | None
    forced_answer: bool  # the answer was forced by the budget or the deadline
    waits: int = 0
    confidence: float | None = None
    score: float | None = None
    text: str = ""


@dataclass
class Trace:
    """What a strategy did for one request."""

    strategy: str
    answer: str | None
    rows: list[RowTrace]
    rows_used: int
    early_stop: str | None  # why sampling stopped before its full budget of rows, if it did
    votes: dict[str, float]
    wall_s: float
    ttft_s: float | None
    generated_tokens: int
    deadline_ms: float | None = None
    deadline_met: bool | None = None
    prompt_tokens: int = 0  # of one prefill (every round of rows prefills it again)

    def to_dict(self, with_text: bool = False) -> dict:
        d = asdict(self)
        if not with_text:
            for r in d["rows"]:
                r.pop("text")
        return d


class BudgetController:
    """Engine controller enforcing the thinking budget, the answer budget and the deadline."""

    def __init__(self, engine: Engine, family: Family, cfg: RunConfig, started: float, deadline_s: float | None,
                 prompt_tokens: int = 1):  # fmt: skip
        self.family = family
        self.cfg = cfg
        # An engine that cannot step hands back whole rounds of text: the end of thinking is found
        # in the text, and a forced text is one entry of the row.
        self.text_mode = not engine.steppable
        self.end_ids = engine.tokenize(family.think_end) if family.think_end and not self.text_mode else []
        self.forced_len = engine.count_tokens(family.think_end + family.answer_prefix)
        self.prompt_tokens = max(1, prompt_tokens)
        self.token_s: float | None = None  # prefill cost of one token
        self.answer_start: dict[int, int] = {}  # row -> index in row.tokens where the answer begins
        self.think_count: dict[int, int] = {}  # row -> sampled thinking tokens when its reasoning ended
        self.forced_answer: set[int] = set()
        self.waits: dict[int, int] = {}
        self.started = started
        self.deadline_s = deadline_s  # seconds after ``started``
        self.expected_tokens = cfg.expected_tokens
        self.last_step: float | None = None
        self.step_s = self.quiet_s = 0.0  # running estimates of one decode step (quiet_s: stalls left out)
        # The longest wait seen beyond a step's running estimate (another process had the CPU), and the
        # one the engine says to expect where it measures its stalls: the answer keeps room for one more.
        self.stall_s = self.engine_stall = 0.0
        self.earlier_rounds = False  # a call of the strategy ran before this one (its rows finished)

    # hooks ------------------------------------------------------------------------------
    def on_think_end(self, ctl: Control, row: Row) -> bool:
        """Called when a row ends its reasoning on its own; return True if the hook replaced it."""
        return False

    def on_step(self, ctl: Control, stepped: list[int]) -> None:
        """Called after the budget rules each step."""

    # -------------------------------------------------------------------------------------
    def thinking_tokens(self, row: Row) -> int:
        return self.think_count.get(row.index, row.n_generated)

    def expired(self, min_s: float = 0.0) -> str | None:
        """Why a call not started yet should not start: cancelled, or its deadline leaves less than ``min_s``."""
        if self.cfg.cancel is not None and self.cfg.cancel.is_set():
            return "cancelled"
        if self.deadline_s is not None and time.perf_counter() - self.started + min_s >= self.deadline_s:
            return "deadline"
        return None

    def due(self) -> float | None:
        """When the call must be done (``time.perf_counter()`` seconds), or None without a deadline."""
        return None if self.deadline_s is None else self.started + self.deadline_s

    def horizon(self, row: Row) -> int:
        """Tokens ``row`` may sample before this controller must see it again (engines that cannot step)."""
        if row.index in self.answer_start:
            return max(1, self.cfg.answer_tokens - (row.n_generated - self.think_count[row.index]))
        return max(1, self.cfg.budget - row.n_generated)

    def _force_answer(self, ctl: Control, row: Row) -> None:
        ctl.force(row.index, self.family.think_end + self.family.answer_prefix, extra_tokens=self.cfg.answer_tokens)
        self.forced_answer.add(row.index)
        self.answer_start[row.index] = len(row.tokens) + (1 if self.text_mode else len(self.end_ids))
        self.think_count[row.index] = row.n_generated

    def _end_in_text(self, row: Row) -> None:
        """Text mode: where the row's own end of thinking fell in a round's text, in estimated tokens."""
        text, end = row.text, self.family.think_end
        at = text.find(end) if end else -1
        if at < 0:
            return
        after = len(text) - at - len(end)  # characters of answer the round already wrote
        answered = round(row.n_generated * after / max(1, len(text)))
        self.answer_start[row.index] = len(row.tokens) - answered
        self.think_count[row.index] = row.n_generated - answered

    def _answer_due(self, now: float, rows: int, steps: int) -> bool:
        """Whether ``rows`` rows must be given the answer prefix now for the answer to be stated before the
        deadline: the forced text's decode, ``steps`` answer steps (with their safety) and one stall like
        the longest seen no longer fit in what is left.  Thinking rows are forced when the answer's
        reserved steps (``ANSWER_STEPS``) no longer fit; a row that ends its thinking on its own gets the
        prefix at once when an answer of its own, which may take all its ``answer_tokens``, would not fit:
        it then states the answer in a few tokens instead of a sentence of its own that the deadline would
        cut."""
        if self.deadline_s is None or self.text_mode:
            return False
        forced_decode = rows * self.forced_len * (self.token_s or 0)
        stall = max(self.stall_s, self.engine_stall)
        return self.deadline_s - now < forced_decode + (steps + 1) * self.step_s * ANSWER_SAFETY + stall

    def _grace(self, ctl: Control, left: float, thinking: list[Row], forced_decode: float) -> bool:
        """When the deadline has come, or not even the forced text fits before it, and ``cfg.grace_ms``
        past it remain: rows stating their answer go on; rows still reasoning (a stall carried them past
        the moment their answer was due; ``thinking``, whose forced text decodes in ``forced_decode``) are
        given the answer prefix where its decode and the answer's steps fit in the grace, else cut.  Steps
        are counted at their pace without stalls (``quiet_s``): the one that carried the row here would
        count twice.  A call none of whose rows has finished, in a strategy's first round (it would come
        back with no answer at all), has ``cfg.rescue_ms`` instead where that is longer.  False: stop every
        row now."""
        grace = self.cfg.grace_ms
        if grace > 0 and not self.earlier_rounds and not any(r.finished for r in ctl.rows):
            grace = max(grace, self.cfg.rescue_ms)
        room, step = left + grace / 1000, self.quiet_s
        if grace <= 0 or room < step:  # no grace (run, C): exactly the stop at the deadline
            return False
        for r in thinking:
            if room >= forced_decode + (min(self.cfg.answer_tokens, ANSWER_STEPS) + 1) * step:
                self._force_answer(ctl, r)
            else:
                ctl.stop(r.index, "deadline")
        return bool(ctl.live())

    def __call__(self, ctl: Control, stepped: list[int]) -> None:
        if self.cfg.cancel is not None and self.cfg.cancel.is_set():
            ctl.stop_all("cancelled")
            return
        now = time.perf_counter() - self.started
        engine_step = ctl.step_s  # a shared batch's own estimate of its rounds
        if self.last_step is None:  # the first call follows the prefill: its cost a token (without any wait
            prefill = ctl.prefill_s if ctl.prefill_s is not None else now  # in a queue before it)
            self.token_s = prefill / self.prompt_tokens
            self.step_s = self.quiet_s = engine_step or 0.0  # the engine's estimate, where it has one
        elif engine_step:
            # A shared batch: the time between this call's steps counts the rounds it was left out of, but
            # from its last rounds on (LAST_CHANCE_ROUNDS before its end) it is in every round, each
            # costing what the batch estimates, and it measures its stalls itself; the answer is forced by
            # that round, within those rounds (a step inflated by the rounds missed had a starved job cut
            # at its end with nothing said).
            self.step_s = self.quiet_s = engine_step
        else:
            dt = now - self.last_step
            if self.step_s and engine_step is None:  # alone on its engine: a wait that may recur
                self.stall_s = max(self.stall_s, dt - self.step_s)
            self.step_s = dt if self.step_s == 0 else 0.7 * self.step_s + 0.3 * dt
            # the same, with a step counted at most twice the estimate: a stall barely moves it, a device
            # that slowed down moves it within a few steps (the grace past the deadline goes by it)
            self.quiet_s = dt if self.quiet_s == 0 else 0.7 * self.quiet_s + 0.3 * min(dt, 2 * self.quiet_s)
        self.engine_stall = ctl.stall_s or 0.0  # the stall the engine says to expect
        self.last_step = now
        for i in stepped:
            r = ctl.rows[i]
            if self.text_mode and i not in self.answer_start:
                self._end_in_text(r)  # also for rows that just finished: their traces count answer tokens
            if r.finished:
                continue
            if i in self.answer_start:
                if r.n_generated - self.think_count[i] >= self.cfg.answer_tokens:
                    ctl.stop(i, "length")
            elif self.end_ids and r.tokens[-len(self.end_ids) :] == self.end_ids and not r.forced[-1]:
                if not self.on_think_end(ctl, r):
                    self.answer_start[i] = len(r.tokens) - len(self.end_ids)  # the delimiter is not thinking
                    self.think_count[i] = r.n_generated - len(self.end_ids)
                    if self._answer_due(now, 1, self.cfg.answer_tokens):  # its own answer may not end in time
                        ctl.force(i, self.family.answer_prefix)
            elif self.thinking_tokens(r) >= self.cfg.budget:
                self._force_answer(ctl, r)
        if self.deadline_s is not None and self.text_mode:
            if now >= self.deadline_s:  # rounds cannot be cut: the deadline is checked between them
                ctl.stop_all("deadline")
                return
        elif self.deadline_s is not None:
            left = self.deadline_s - now
            thinking = [r for r in ctl.live() if r.index not in self.answer_start and r.index not in ctl.pending]
            forced_decode = len(thinking) * self.forced_len * (self.token_s or 0)
            due = thinking and self._answer_due(now, len(thinking), min(self.cfg.answer_tokens, ANSWER_STEPS))
            # The end has come, or not even the forced text fits before it: stop on time, or use the grace.
            if left < self.step_s or (due and left < forced_decode + self.step_s):
                if not self._grace(ctl, left, thinking, forced_decode):
                    ctl.stop_all("deadline")
                    return
                self.on_step(ctl, stepped)
                return
            if due:
                for r in thinking:
                    self._force_answer(ctl, r)
        self.on_step(ctl, stepped)


class Strategy(ABC):
    """Base class: set ``name`` and ``requires``, implement :meth:`run`."""

    name: ClassVar[str] = ""
    # Engine capabilities the strategy needs; every budget needs forced text (the cut answer).
    requires: ClassVar[tuple[str, ...]] = ("forced_tokens",)
    controller_class: ClassVar[type[BudgetController]] = BudgetController
    # What profiling needs to know (edgetts.profiling reads these, never strategy names):
    single_row: ClassVar[bool] = False  # always one row: a sweep measures it at n = 1 only
    pooled: ClassVar[bool] = False  # pool_estimate/pool_rounds can stand in for running it

    @classmethod
    def pool_estimate(cls, n: int, samples, verdicts: dict, rng) -> Estimate:
        """Expected correctness and cost at parallelism ``n`` from a pool (see :mod:`.pooling`)."""
        raise NotImplementedError(f"strategy {cls.name!r} cannot be estimated from a pool")

    @classmethod
    def pool_rounds(cls, n: int, samples) -> list[list]:
        """The rounds of pool rows a direct run at parallelism ``n`` would decode."""
        return [list(samples[: 1 if cls.single_row else n])]

    def __init__(self, engine: Engine, family: Family, cfg: RunConfig, **options):
        missing = [cap for cap in self.requires if not getattr(engine, cap, False)]
        if missing:
            raise StrategyError(f"strategy {self.name!r} needs an engine with {', '.join(missing)}; "
                                f"{engine.name!r} lacks it")  # fmt: skip
        self.engine, self.family, self.cfg = engine, family, cfg
        self._sampled = False  # a round of the current run has been sampled (its rows finished)
        self.configure(**options)

    def configure(self, **options) -> None:
        if options:
            raise StrategyError(f"strategy {self.name!r} takes no options, got {', '.join(options)}")

    @abstractmethod
    def run(self, question: str) -> Trace: ...

    # helpers -----------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        self._sampled = False  # every run begins with its prompt: no round of it has run yet
        messages = None
        if self.cfg.messages:  # the question (a strategy may have added to it) is the last turn
            messages = [*self.cfg.messages[:-1], dict(self.cfg.messages[-1], content=question)]
        try:
            return build_prompt(self.family, question, self.engine.chat_template(), raw=self.cfg.raw_prompt,
                                messages=messages)  # fmt: skip
        except ChatTemplateRefused as e:  # the request's messages, not the model, are at fault
            raise StrategyError(str(e)) from None

    def sample(self, prompt: str, n: int, started: float, seeds: list[int], logprobs: int | None = None,
               controller: BudgetController | None = None,
               max_tokens: int | None = None) -> tuple[SampleResult, BudgetController]:  # fmt: skip
        """Run ``n`` rows under the budget controller (deadline measured from ``started``)."""
        deadline = self.cfg.deadline_ms / 1000 if self.cfg.deadline_ms is not None else None
        if self.cfg.ends_at is not None:
            deadline = self.cfg.ends_at - started
        ctl = controller or self.controller_class(self.engine, self.family, self.cfg, started, deadline)
        ctl.started, ctl.deadline_s = started, deadline
        ctl.earlier_rounds, self._sampled = self._sampled, True
        ctl.prompt_tokens = self.engine.count_tokens(prompt) + 1
        params = replace(self.cfg.sampling, max_tokens=max_tokens or self.cfg.budget + self.cfg.answer_tokens,
                         logprobs=logprobs)  # fmt: skip
        res = self.engine.sample(prompt, n, params, controller=ctl, seeds=seeds)
        self.prompt_tokens = res.prompt_tokens
        return res, ctl

    def seeds(self, start: int, count: int) -> list[int]:
        return [self.cfg.sampling.seed + i for i in range(start, start + count)]

    def row_trace(self, row: Row, ctl: BudgetController) -> RowTrace:
        ans_at = ctl.answer_start.get(row.index, len(row.tokens))
        # A row stopped (deadline, cancel) while still reasoning stated no answer: a number from the
        # middle of its reasoning is not a vote.
        cut = bool(self.family.think_end) and row.index not in ctl.answer_start and row.finish_reason != "stop"
        return RowTrace(
            thinking_tokens=sum(1 for f in row.forced[:ans_at] if not f),
            answer_tokens=sum(1 for f in row.forced[ans_at:] if not f),
            answer=None if cut else self.answer(row),
            finish_reason=row.finish_reason,
            forced_answer=row.index in ctl.forced_answer,
            waits=ctl.waits.get(row.index, 0),
            text=row.text,
        )

    def answer(self, row: Row) -> str | None:
        return extract_answer(row.text, self.family.think_start, self.family.think_end)

    def trace(self, rows: list[RowTrace], answer, votes, started: float, ttft, early_stop=None) -> Trace:
        wall = time.perf_counter() - started
        if early_stop is None and any(r.finish_reason == "deadline" for r in rows):
            early_stop = "deadline"  # the result says why rows (or the answer) are missing
        met = None if self.cfg.deadline_ms is None else wall * 1000 <= self.cfg.deadline_ms
        return Trace(self.name, answer, rows, len(rows), early_stop, votes, wall, ttft,
                     sum(r.thinking_tokens + r.answer_tokens for r in rows), self.cfg.deadline_ms, met,
                     getattr(self, "prompt_tokens", 0))  # fmt: skip
