"""Runs requests on the engines named by a Pareto config, one at a time, under their deadlines.

The executor owns one llama.cpp engine per model artifact of the frontier (opened on first
use) and runs a request's point with its strategy, n and budget, the request's deadline and
optional overrides (temperature, seed, a cap on the budget).  Engines are not thread-safe and
a device runs one batch at a time anyway, so callers serialize through :meth:`run` (the server
keeps a single worker).  After every request the observed latency goes back to the policy
(recalibration).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from edgetts.engines.base import SamplingParams
from edgetts.runtime.policy import Policy, Selection
from edgetts.strategies import STRATEGIES, RunConfig, StrategyError, create


@dataclass
class Request:
    question: str
    deadline_ms: float
    temperature: float = 1.0
    seed: int = 0
    max_tokens: int | None = None  # caps the thinking budget
    strategy: str | None = None  # expert overrides
    n: int | None = None
    budget: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


RESERVE_MS, RESERVE_SHARE = 3.0, 0.1


class Late(Exception):
    """The request waited so long that not even the fastest point can answer it in time."""

    def __init__(self, waited_ms: float):
        super().__init__(f"waited {waited_ms:.0f} ms in the queue; no point can answer before the deadline")
        self.waited_ms = waited_ms


class Executor:
    def __init__(self, policy: Policy, threads: int | None = None, gpu_layers: int = 0):
        self.policy = policy
        self.threads, self.gpu_layers = threads, gpu_layers
        self.engines: dict[str, tuple] = {}
        self.max_n = max(p["n"] for p in policy.frontier)
        self.max_budget = max(p["budget"] for p in policy.frontier)

    def engine(self, artifact: str):
        if artifact not in self.engines:
            from edgetts.engines.llamacpp import LlamaCppEngine
            from edgetts.models.families import guess_family

            n = max(self.max_n, 16)
            e = LlamaCppEngine(artifact, n_ctx=n * (4 * self.max_budget + 160) + 1024, n_threads=self.threads,
                               n_gpu_layers=self.gpu_layers, max_rows=n)  # fmt: skip
            self.engines[artifact] = (e, guess_family(artifact, e.chat_template(), e.meta("general.name")))
        return self.engines[artifact]

    def plan(self, req: Request, budget_ms: float | None = None) -> tuple[Selection, str, int, int]:
        """The point for ``req`` (within ``budget_ms`` when given) and the strategy, n and budget to run."""
        choice = self.policy.select(req.deadline_ms if budget_ms is None else budget_ms)
        p = choice.point
        strategy = req.strategy or p["strategy"]
        if strategy not in STRATEGIES:
            raise StrategyError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        n = req.n or p["n"]
        if n > max(self.max_n, 16):
            raise StrategyError(f"n must be at most {max(self.max_n, 16)} on this server, got {n}")
        budget = req.budget or p["budget"]
        if req.max_tokens:
            budget = min(budget, req.max_tokens)
        return choice, strategy, n, budget

    def run(self, req: Request, choice: Selection, strategy: str, n: int, budget: int, started: float,
            factor: float = 1.0) -> dict:  # fmt: skip
        """Run the planned point; ``factor`` scales predictions to what the worker really takes."""
        begin = time.perf_counter()
        left = req.deadline_ms - 1000 * (begin - started)  # time already spent in the queue
        expert = req.strategy or req.n or req.budget
        if not expert and self.policy.predicted_ms(choice.point) * factor > left:
            # The queue took longer than admission predicted: downgrade now rather than be late,
            # or give up at once when not even the fastest point fits (load shedding).
            choice, strategy, n, budget = self.plan(req, max(left / factor, 0.0))
            if choice.miss:
                raise Late(1000 * (begin - started))
        engine, family = self.engine(choice.point["artifact"])
        # Strategies stop within one decode step after their deadline; keep that step, and the
        # time to build the response, inside the request's deadline.
        reserve = RESERVE_MS + RESERVE_SHARE * max(left, 0.0)
        cfg = RunConfig(n=n, budget=budget, deadline_ms=max(left - reserve, 1.0), cancel=req.cancel,
                        sampling=SamplingParams(temperature=req.temperature, seed=req.seed))  # fmt: skip
        trace = create(strategy, engine, family, cfg).run(req.question)
        if strategy == choice.point["strategy"] and n == choice.point["n"] and budget == choice.point["budget"]:
            self.policy.observe(choice.point["id"], 1000 * trace.wall_s)
        total_ms = 1000 * (time.perf_counter() - started)
        return {"trace": trace, "total_ms": total_ms, "deadline_met": total_ms <= req.deadline_ms, "choice": choice,
                "service_ms": 1000 * (time.perf_counter() - begin),
                "strategy": strategy, "n": n, "budget": budget}  # fmt: skip

    def close(self) -> None:
        for e, _ in self.engines.values():
            e.close()
