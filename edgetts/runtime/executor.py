"""Runs requests on the engines named by a Pareto config, many at once, under their deadlines.

The executor opens, on first use, the engine each frontier point names (its engine spec:
llama.cpp on a GGUF, ONNX Runtime GenAI, an OpenAI-compatible server...) through
:func:`edgetts.engines.open_engine`, sized for the frontier's largest budget and for ``rows``
rows at once.  A llama.cpp engine is put behind a :class:`~edgetts.engines.batching.Scheduler`
(continuous batching: concurrent requests share decode steps, each row in its own cache stream
so that it attends over its own cells only); with ``batching=False``, and for
engines that are not thread-safe, a lock runs one request at a time (:class:`SerialEngine`).
Engines that are thread-safe themselves (a remote server) are called concurrently.

:meth:`Executor.run` runs a request's :class:`~edgetts.runtime.planning.Plan` with its strategy,
n and budget, under the request's deadline.  :meth:`Executor.predict_ms` tells what a point
would take beside the requests already admitted (the occupancy), from the scheduler's measured
step costs, or from the queue ahead on a serial engine.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass

from edgetts.engines import Engine, open_engine
from edgetts.engines.base import Row, SampleResult, SamplingParams
from edgetts.models.families import Family
from edgetts.pareto.config import point_spec
from edgetts.runtime.planning import RESERVE_MS, RESERVE_SHARE, Late, Plan, Request, make_plan
from edgetts.runtime.policy import Policy
from edgetts.strategies import RunConfig, Trace, create

__all__ = ["Executor", "Late", "Outcome", "Request", "SerialEngine"]


@dataclass(frozen=True)
class Outcome:
    trace: Trace
    plan: Plan
    total_ms: float  # from the request's arrival
    service_ms: float  # from the start of its run (queueing inside the engine included)
    deadline_met: bool


def unstarted(n: int, reason: str) -> SampleResult:
    """The result of a call dropped before it started: rows with no tokens, finished ``reason``."""
    rows = [Row(i, 0, finished=True, finish_reason=reason) for i in range(n)]
    return SampleResult(rows, 0, 0.0, 0.0, 0)


class SerialEngine(Engine):
    """A lock around an engine, so concurrent callers take turns; a call that expired while
    waiting for its turn is dropped without running."""

    thread_safe = True

    def __init__(self, engine: Engine):
        self.inner, self.lock = engine, threading.Lock()
        for cap in ("name", "parallel_rows", "forced_tokens", "logprobs", "steppable", "probes"):
            setattr(self, cap, getattr(engine, cap))
        self.waiting = 0

    def sample(self, prompt, n, params, controller=None, seeds=None) -> SampleResult:
        self.waiting += 1
        try:
            with self.lock:
                expired = getattr(controller, "expired", None)
                reason = expired() if expired else None
                if reason:
                    return unstarted(n, reason)
                return self.inner.sample(prompt, n, params, controller, seeds)
        finally:
            self.waiting -= 1

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def chat_template(self) -> str | None:
        return self.inner.chat_template()

    def close(self) -> None:
        self.inner.close()


class Executor:
    def __init__(self, policy: Policy, threads: int | None = None, gpu_layers: int | None = None,
                 batching: bool = True, rows: int | None = None):  # fmt: skip
        self.policy = policy
        self.threads, self.gpu_layers, self.batching = threads, gpu_layers, batching
        self.engines: dict[str, tuple[Engine, Family]] = {}
        self.max_n = max(p["n"] for p in policy.frontier)
        self.max_budget = max(p["budget"] for p in policy.frontier)
        # Rows decoded together: room for a few requests of the widest point side by side.
        self.rows = rows or (max(16, 2 * self.max_n) if batching else self.max_n)

    def engine(self, point: dict) -> tuple[Engine, Family]:
        """The engine (and reasoning family) of a frontier point, opened once per engine spec."""
        # A shared batch of many requests attends best over a stream per row (no other row's cells).
        split = {"kv_unified": False} if self.batching else {}
        spec = point_spec(point).with_options(threads=self.threads, gpu_layers=self.gpu_layers, **split)
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self.engines:
            answer = RunConfig().answer_tokens
            engine, family = open_engine(spec, max_rows=self.rows, max_tokens=self.max_budget + answer)
            if self.batching and engine.name == "llama.cpp":
                from edgetts.engines.batching import BatchedEngine

                engine = BatchedEngine(engine)
            elif not getattr(engine, "thread_safe", False) or not self.batching:
                engine = SerialEngine(engine)
            self.engines[key] = (engine, family)
        return self.engines[key]

    def plan(self, req: Request, budget_ms: float | None = None, cost=None) -> Plan:
        """The plan for ``req`` within ``budget_ms`` (default: its deadline); ``cost(point)`` predicts ms."""
        return make_plan(self.policy, req, req.deadline_ms if budget_ms is None else budget_ms, self.max_n,
                         self.max_budget, cost)  # fmt: skip

    def predict_ms(self, point: dict, busy: list[Plan]) -> float:
        """Predicted latency of ``point`` run beside the ``busy`` plans already admitted."""
        solo = self.policy.predicted_ms(point)
        engine, _ = self.engine(point)
        scheduler = getattr(engine, "scheduler", None)
        if scheduler is not None:
            rows = sum(p.n for p in busy)
            n = point["n"]
            total = rows + n
            waves = math.ceil(total / self.rows)  # beyond the engine's rows, requests wait their turn
            a, b = scheduler.step_cost(0), scheduler.step_cost(1) - scheduler.step_cost(0)
            if a + b <= 0:  # nothing measured yet: compute-bound guess, a step costs its rows
                return solo * waves * min(total, self.rows) / n
            return solo * waves * (a + b * min(total, self.rows)) / (a + b * n)
        if isinstance(engine, SerialEngine):
            return solo + sum(p.predicted_ms for p in busy)
        return solo

    def run(self, req: Request, plan: Plan, started: float) -> Outcome:
        """Run ``plan`` for ``req`` (which arrived at ``started``); :class:`Late` if it was dropped unstarted."""
        begin = time.perf_counter()
        left = req.deadline_ms - 1000 * (begin - started)
        engine, family = self.engine(plan.point)
        reserve = RESERVE_MS + RESERVE_SHARE * max(left, 0.0)
        sampling = SamplingParams(temperature=req.temperature, seed=req.seed)
        cfg = RunConfig(n=plan.n, budget=plan.budget, deadline_ms=max(left - reserve, 1.0), cancel=req.cancel,
                        messages=req.messages, sampling=sampling)  # fmt: skip
        trace = create(plan.strategy, engine, family, cfg).run(req.question)
        now = time.perf_counter()
        if not trace.generated_tokens and trace.early_stop == "deadline":
            raise Late(1000 * (now - started))  # dropped while queued: nothing was computed
        if plan.as_profiled and not req.cancel.is_set():
            # What the point would have taken alone: the measurement scaled by the occupancy it ran at.
            self.policy.observe(plan.point["id"], 1000 * trace.wall_s * plan.solo_ms / max(plan.predicted_ms, 1e-9))
        total_ms = 1000 * (now - started)
        return Outcome(trace, plan, total_ms, 1000 * (now - begin), total_ms <= req.deadline_ms)

    def close(self) -> None:
        for e, _ in self.engines.values():
            e.close()
