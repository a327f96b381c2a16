"""Runs requests on the engines named by a Pareto config, one at a time, under their deadlines.

The executor opens, on first use, the engine each frontier point names (its engine spec:
llama.cpp on a GGUF, ONNX Runtime GenAI, an OpenAI-compatible server...) through
:func:`edgetts.engines.open_engine`, sized for the largest n and budget of the frontier, and
runs a request's :class:`~edgetts.runtime.planning.Plan` with its strategy, n and budget, the
request's deadline and its temperature and seed.  Engines are not thread-safe and a device
runs one batch at a time anyway, so callers serialize through :meth:`run` (the server keeps a
single worker).  After every request that ran a point as profiled, the observed latency goes
back to the policy (recalibration).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from edgetts.engines import Engine, open_engine
from edgetts.engines.base import SamplingParams
from edgetts.models.families import Family
from edgetts.pareto.config import point_spec
from edgetts.runtime.planning import RESERVE_MS, RESERVE_SHARE, Late, Plan, Request, make_plan
from edgetts.runtime.policy import Policy
from edgetts.strategies import RunConfig, Trace, create

__all__ = ["Executor", "Late", "Outcome", "Request"]


@dataclass(frozen=True)
class Outcome:
    trace: Trace
    plan: Plan  # what really ran (after a downgrade, if the queue ran late)
    total_ms: float  # from the request's arrival
    service_ms: float  # on the worker
    deadline_met: bool


class Executor:
    def __init__(self, policy: Policy, threads: int | None = None, gpu_layers: int | None = None):
        self.policy = policy
        self.threads, self.gpu_layers = threads, gpu_layers
        self.engines: dict[str, tuple[Engine, Family]] = {}
        self.max_n = max(p["n"] for p in policy.frontier)
        self.max_budget = max(p["budget"] for p in policy.frontier)

    def engine(self, point: dict) -> tuple[Engine, Family]:
        """The engine (and reasoning family) of a frontier point, opened once per engine spec."""
        spec = point_spec(point).with_options(threads=self.threads, gpu_layers=self.gpu_layers)
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self.engines:
            answer = RunConfig().answer_tokens
            self.engines[key] = open_engine(spec, max_rows=self.max_n, max_tokens=self.max_budget + answer)
        return self.engines[key]

    def plan(self, req: Request, budget_ms: float | None = None) -> Plan:
        """The plan for ``req`` within ``budget_ms`` (default: its whole deadline)."""
        return make_plan(self.policy, req, req.deadline_ms if budget_ms is None else budget_ms, self.max_n,
                         self.max_budget)

    def run(self, req: Request, plan: Plan, started: float, factor: float = 1.0) -> Outcome:
        """Run ``plan``; ``factor`` scales predictions to what the worker really takes."""
        begin = time.perf_counter()
        left = req.deadline_ms - 1000 * (begin - started)  # time already spent in the queue
        if not req.expert and self.policy.predicted_ms(plan.point) * factor > left:
            # The queue took longer than admission predicted: downgrade now rather than be late,
            # or give up at once when not even the fastest point fits (load shedding).
            plan = self.plan(req, max(left / factor, 0.0))
            if plan.choice.miss:
                raise Late(1000 * (begin - started))
        engine, family = self.engine(plan.point)
        reserve = RESERVE_MS + RESERVE_SHARE * max(left, 0.0)
        cfg = RunConfig(n=plan.n, budget=plan.budget, deadline_ms=max(left - reserve, 1.0), cancel=req.cancel,
                        sampling=SamplingParams(temperature=req.temperature, seed=req.seed))  # fmt: skip
        trace = create(plan.strategy, engine, family, cfg).run(req.question)
        if plan.as_profiled:
            self.policy.observe(plan.point["id"], 1000 * trace.wall_s)
        now = time.perf_counter()
        total_ms = 1000 * (now - started)
        return Outcome(trace, plan, total_ms, 1000 * (now - begin), total_ms <= req.deadline_ms)

    def close(self) -> None:
        for e, _ in self.engines.values():
            e.close()
