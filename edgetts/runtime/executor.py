"""Runs requests on the engines named by a Pareto config, many at once, under their deadlines.

The executor opens, on first use, the engine each frontier point names (its engine spec:
llama.cpp on a GGUF, ONNX Runtime GenAI, an OpenAI-compatible server...) through
:func:`edgetts.engines.open_engine`, sized for the frontier's largest budget and for ``rows``
rows at once.  A llama.cpp engine is put behind a :class:`~edgetts.engines.batching.Scheduler`
(continuous batching: concurrent requests share decode steps, each row in its own cache stream
so that it attends over its own cells only); with ``batching=False``, and for
engines that are not thread-safe, a lock runs one request at a time (:class:`SerialEngine`).
Engines that are thread-safe themselves (``openai-http``: a remote server, which batches the
requests it gets at once) are called concurrently, up to the engine's own bound.

:meth:`Executor.run` runs a request's :class:`~edgetts.runtime.planning.Plan` with its strategy,
n and budget, under the request's deadline.  :meth:`Executor.predict_ms` tells what a point
would take beside the requests already admitted (the occupancy): a shared batch answers from
its own model of itself (the scheduler's measured round costs and the device's speed now), a
serial engine from the queue ahead.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass

from edgetts.engines import Engine, open_engine
from edgetts.engines.base import EngineError, Row, SampleResult, SamplingParams
from edgetts.engines.memory import MemoryShortfall
from edgetts.engines.spec import ContextPlan, engine_memory, settings_note
from edgetts.engines.stalls import Stalls, Timed
from edgetts.models.families import Family
from edgetts.pareto.config import point_spec, profiled_with
from edgetts.runtime.planning import Late, Plan, Request, make_plan
from edgetts.runtime.policy import Policy
from edgetts.strategies import RunConfig, Trace, create
from edgetts.telemetry.device import with_power_mode
from edgetts.timing import ANSWER_ROUNDS

__all__ = ["Executor", "Late", "Outcome", "Request", "SerialEngine"]

# Share of the free memory the default batch may plan for: the rest is for the process and the
# device's other work (allocations llama.cpp makes beside its plan, a camera pipeline...).
HEADROOM = 0.85


def rows_that_fit(specs: list, most: int, tokens: int, cap: float | None, headroom: float) -> int:
    """The most rows (0..``most``) with which the engines of ``specs``, side by side, for ``tokens``
    tokens a row fit in memory (``headroom`` of what is free, under the cap); engines that cannot
    tell their memory (a server) count for nothing."""
    from edgetts.engines.memory import shortfall

    def fits(rows: int) -> bool:
        plans = [p for p in (engine_memory(s, ContextPlan(rows, tokens)) for s in specs) if p is not None]
        return not plans or shortfall(sum(plans[1:], plans[0]), cap, headroom) is None

    lo, hi = 0, most  # memory grows with rows: the largest that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass(frozen=True)
class Outcome:
    trace: Trace
    total_ms: float  # from the request's arrival
    deadline_met: bool
    engine_ms: float | None = None  # on a serial engine: the time its calls held the engine (its turns' waits out)


def unstarted(n: int, reason: str) -> SampleResult:
    """The result of a call dropped before it started: rows with no tokens, finished ``reason``."""
    rows = [Row(i, 0, finished=True, finish_reason=reason) for i in range(n)]
    return SampleResult(rows, 0, 0.0, 0.0, 0)


class SerialEngine(Engine):
    """A lock around an engine, so concurrent callers take turns; a call that expired while
    waiting for its turn, or whose deadline no longer leaves the time to state an answer (the prompt
    and ``ANSWER_ROUNDS`` steps of its rows as the latest call took them, and a stall), is dropped
    without running, as a shared batch drops a queued job: started, it would be cut with nothing said."""

    thread_safe = True

    def __init__(self, engine: Engine):
        self.inner, self.lock = engine, threading.Lock()
        self.held = threading.local()  # per calling thread: seconds its calls held the engine
        self.stalls = Stalls()  # waits beyond a step, measured on every call (controllers get the one to expect)
        for cap in ("name", "parallel_rows", "forced_tokens", "logprobs", "steppable", "probes"):
            setattr(self, cap, getattr(engine, cap))

    def sample(self, prompt, n, params, controller=None, seeds=None) -> SampleResult:
        with self.lock:
            expired = getattr(controller, "expired", None)
            s = self.stalls
            reason = expired(s.prefill_s + ANSWER_ROUNDS * s.row_step_s * n + s.stall_s()) if expired else None
            if reason:
                return unstarted(n, reason)
            t0 = time.perf_counter()
            try:
                timed = Timed(controller, self.stalls) if controller is not None else None
                return self.inner.sample(prompt, n, params, timed, seeds)
            finally:
                self.held.s = getattr(self.held, "s", 0.0) + time.perf_counter() - t0

    def take_held_s(self) -> float:
        """Seconds the calling thread's calls held the engine since it last asked (its waits for a turn left
        out): what its requests took alone, which the policy may recalibrate from under any load."""
        held, self.held.s = getattr(self.held, "s", 0.0), 0.0
        return held

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def chat_template(self) -> str | None:
        return self.inner.chat_template()

    def settings(self) -> dict:
        return self.inner.settings()

    def close(self) -> None:
        self.inner.close()


def _held(busy: list[Plan]) -> list[tuple[float, float, int]]:
    """The admitted plans as a shared batch weighs them: (end, time alone in ms, rows)."""
    return [(p.end, p.solo_ms, p.n) for p in busy]


class Executor:
    """Opens and runs the engines of a Pareto config's points (see the module doc).

    ``threads`` and ``gpu_layers`` are the user's run-time settings (None: this device's defaults,
    never the ones the points were profiled with; ``notify`` gets one line per engine whose settings
    differ from its points' ``profiled_with``).  ``rows`` is the running batch's size; by default the
    most that fit in ``memory_mb`` (else what the device has free) with headroom, at most
    max(64, 8 x the widest point's n).
    """

    def __init__(self, policy: Policy, threads: int | None = None, gpu_layers: int | None = None,
                 batching: bool = True, rows: int | None = None, memory_mb: float | None = None,
                 notify=None):  # fmt: skip
        self.policy = policy
        self.threads, self.gpu_layers, self.batching = threads, gpu_layers, batching
        self.memory_mb, self.notify = memory_mb, notify or (lambda line: None)
        self.engines: dict[str, tuple[Engine, Family]] = {}
        self.by_point: dict[str, tuple[dict, tuple[Engine, Family]]] = {}  # point id -> (that point, its engine)
        self.max_n = max(p["n"] for p in policy.frontier)
        self.max_budget = max(p["budget"] for p in policy.frontier)
        self.tokens = self.max_budget + RunConfig().answer_tokens  # what a row may decode at most
        # Rows in the running batch: room for several requests of the widest point side by side (a
        # round decodes only those it can afford; the others hold their cells and wait a round), as
        # many as the device's memory holds.
        self.rows = rows or (self._fitting_rows(max(64, 8 * self.max_n)) if batching else self.max_n)

    def _spec(self, point: dict):
        # A shared batch of many requests attends best over a stream per row (no other row's cells).
        split = {"kv_unified": False} if self.batching else {}
        return point_spec(point).with_options(threads=self.threads, gpu_layers=self.gpu_layers, **split)

    def specs(self) -> list:
        """The distinct engine specs of the frontier (each opens one engine)."""
        specs = {json.dumps(s.to_dict(), sort_keys=True): s for s in map(self._spec, self.policy.frontier)}
        return list(specs.values())

    def _fitting_rows(self, most: int, headroom: float = HEADROOM) -> int:
        """The most rows (up to ``most``) with which every engine of the frontier fits in memory at once;
        refuses (one line naming ``--batch-rows``) when even the widest point's rows do not fit."""
        specs = self.specs()
        rows = rows_that_fit(specs, most, self.tokens, self.memory_mb, headroom)
        if rows < self.max_n:
            fit = f"--batch-rows {rows} would" if rows else "not even --batch-rows 1 does"
            raise EngineError(
                f"{', '.join(s.label for s in specs)}: {self.max_n} row(s) of {self.tokens} tokens (the frontier's "
                f"widest point) do not fit in the memory the device has{' under --memory-mb' if self.memory_mb else ''}"
                f" ({fit}): lower the frontier's n or budget, or free memory"
            )
        return rows

    def engine(self, point: dict) -> tuple[Engine, Family]:
        """The engine (and reasoning family) of a frontier point, opened once per engine spec."""
        known = self.by_point.get(point["id"])  # admission asks for every point of every plan: no spec work
        if known is not None and known[0] is point:
            return known[1]
        spec = self._spec(point)
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self.engines:
            try:
                engine, family = open_engine(spec, max_rows=self.rows, max_tokens=self.tokens,
                                             memory_mb=self.memory_mb, hint="Lower --batch-rows")  # fmt: skip
            except MemoryShortfall as e:
                if not self.batching:
                    raise
                fit = rows_that_fit(self.specs(), self.rows, self.tokens, self.memory_mb, 1.0)
                raise MemoryShortfall(f"{e} (at most {fit} rows fit: --batch-rows {max(fit, 1)})") from None
            note = settings_note(spec.label, profiled_with(point), with_power_mode(engine.settings()))
            if note:
                self.notify(note)
            if self.batching and engine.name == "llama.cpp":
                from edgetts.engines.batching import BatchedEngine

                engine = BatchedEngine(engine)
            elif not getattr(engine, "thread_safe", False) or not self.batching:
                engine = SerialEngine(engine)
            self.engines[key] = (engine, family)
        self.by_point[point["id"]] = (point, self.engines[key])
        return self.engines[key]

    def plan(self, req: Request, budget_ms: float | None = None, cost=None, price: float = 0.0,
             charge=None) -> Plan:  # fmt: skip
        """The plan for ``req`` within ``budget_ms`` (default: its deadline); ``cost(point)`` predicts ms,
        ``charge(point)`` is what the price multiplies (default: that prediction)."""
        return make_plan(self.policy, req, req.deadline_ms if budget_ms is None else budget_ms, self.max_n,
                         self.max_budget, cost, price, charge)  # fmt: skip

    def predict_ms(self, point: dict, busy: list[Plan], end: float = math.inf) -> float:
        """Predicted latency of ``point`` run beside the ``busy`` plans already admitted, for a request whose
        run ends at ``end`` (:attr:`~edgetts.timing.Deadline.end`): a shared batch answers itself
        (:meth:`~edgetts.engines.batching.Scheduler.cost_ms`); on a serial engine the queue ahead runs first,
        each alone, and a stall of the ones its calls' steps met lately is met once."""
        engine, busy = self._beside(point, busy)
        solo = self.policy.predicted_ms(point)
        scheduler = getattr(engine, "scheduler", None)
        if scheduler is not None:
            return scheduler.cost_ms(solo, point["n"], _held(busy), end)
        if isinstance(engine, SerialEngine):  # and a wait for the CPU, as its calls' steps meet them
            return solo + sum(p.solo_ms for p in busy) + 1000 * engine.stalls.stall_s()
        return solo

    def feasible(self, point: dict, busy: list[Plan], end: float, now: float) -> bool:
        """Whether the batch can still finish everything on time with ``point`` added (its run ending at
        ``end``): the shared batch's own answer (:meth:`~edgetts.engines.batching.Scheduler.fits`); elsewhere
        always."""
        engine, busy = self._beside(point, busy)
        scheduler = getattr(engine, "scheduler", None)
        return scheduler is None or scheduler.fits(self.policy.predicted_ms(point), point["n"], _held(busy), end, now)

    def work_ms(self, point: dict, solo_ms: float | None = None, n: int | None = None) -> float:
        """Engine time a request of ``point`` holds (``solo_ms`` and ``n``: of what actually runs): in a
        shared batch :meth:`~edgetts.engines.batching.Scheduler.work_ms`, on a serial engine its time alone."""
        solo = self.policy.predicted_ms(point) if solo_ms is None else solo_ms
        scheduler = getattr(self.engine(point)[0], "scheduler", None)
        return scheduler.work_ms(solo, n or point["n"]) if scheduler is not None else solo

    def _beside(self, point: dict, busy: list[Plan]) -> tuple[Engine, list[Plan]]:
        """The engine of ``point`` and the ``busy`` plans on it (requests on other engines run apart)."""
        engine, _ = self.engine(point)
        return engine, [p for p in busy if self.engine(p.point)[0] is engine]

    def expected_tokens(self, plan: Plan) -> float | None:
        """Tokens a row of ``plan`` usually takes: the longest per-row figure of the frontier's points
        at its budget (strategies that stop early use fewer rows, not shorter ones).  At a budget no
        point has (an OpenAI client's ``max_tokens: 100``), the points of the nearest budget, their
        rows shortened in proportion where the budget is smaller (a longer budget does not make
        rows longer than they end by themselves)."""
        known = [p for p in self.policy.frontier if p.get("tokens")]
        if not known:
            return None
        nearest = min(abs(p["budget"] - plan.budget) for p in known)
        rows = [p["tokens"] / p["n"] * min(1.0, plan.budget / p["budget"]) for p in known
                if abs(p["budget"] - plan.budget) == nearest]  # fmt: skip
        return max(rows)

    def run(self, req: Request, plan: Plan) -> Outcome:
        """Run ``plan`` for ``req`` until its deadline's end; :class:`Late` if it was dropped unstarted."""
        deadline = req.deadline
        engine, family = self.engine(plan.point)
        sampling = SamplingParams(temperature=req.temperature, seed=req.seed)
        cfg = RunConfig(n=plan.n, budget=plan.budget, deadline_ms=max(deadline.run_ms(time.perf_counter()), 1.0),
                        ends_at=deadline.end, grace_ms=deadline.grace_ms,
                        rescue_ms=deadline.rescue_ms, cancel=req.cancel, messages=req.messages,
                        sampling=sampling, expected_tokens=self.expected_tokens(plan))  # fmt: skip
        serial = isinstance(engine, SerialEngine)
        if serial:
            engine.take_held_s()  # this thread's count starts here
        trace = create(plan.strategy, engine, family, cfg).run(req.question)
        now = time.perf_counter()
        total_ms = deadline.elapsed_ms(now)
        if not trace.generated_tokens and trace.early_stop == "deadline":
            raise Late(total_ms)  # dropped while queued: nothing was computed
        return Outcome(trace, total_ms, now <= deadline.due, 1000 * engine.take_held_s() if serial else None)

    def warm_up(self, question: str = "1+1", budget: int = 16) -> None:
        """Run each local point's strategy and width once, as requests will, before the first one comes: a
        fresh server's first requests otherwise pay for first-time code paths and meet a batch whose step
        cost was fitted on bare decodes only (its rounds' sampling and controllers unseen), and under a
        burst they were admitted at predictions several times too short.  A few rounds do it: at most
        ``budget`` thinking tokens a row, so that a large model on a small device starts in seconds."""
        done = set()
        for point in self.policy.frontier:
            shape = (json.dumps(self._spec(point).to_dict(), sort_keys=True), point["strategy"], point["n"])
            if point.get("url") or shape in done:  # a remote server warms itself
                continue
            done.add(shape)
            engine, family = self.engine(point)
            cfg = RunConfig(n=point["n"], budget=min(point["budget"], budget))
            create(point["strategy"], engine, family, cfg).run(question)  # (run() restarts a serial engine's count)

    def slowdown(self) -> float:
        """The device's slowdown as the shared batches measure it every round (the largest; 1 without one)."""
        return max([e.scheduler.slowdown() for e, _ in self.engines.values() if hasattr(e, "scheduler")] + [1.0])

    def measures_speed(self, point: dict) -> bool:
        """Whether the engine of ``point`` follows the device's speed itself (a shared batch does)."""
        return getattr(self.engine(point)[0], "scheduler", None) is not None

    def unhealthy(self) -> str | None:
        """Why an engine cannot answer (its batch thread is gone), or None while every one can."""
        for engine, _ in self.engines.values():
            why = getattr(engine, "healthy", lambda: None)()
            if why:
                return why
        return None

    def close(self) -> None:
        for e, _ in self.engines.values():
            e.close()
