"""How a request becomes a plan under its deadline: the point, what runs, and the margins.

:func:`make_plan` is the one place a request is planned: the policy picks the most accurate
frontier point whose predicted latency fits the time given, and expert overrides (strategy,
n, budget) and ``max_tokens`` are applied on top.  Admission plans with the time left since
the request arrived, each point's latency predicted where it would run; a request the engine
drops unstarted, because its deadline passed while it waited, ends in :class:`Late`.

The margins of the deadline path live in :mod:`edgetts.timing`, each with why it has its value.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from edgetts.runtime.policy import Policy, Selection
from edgetts.strategies import STRATEGIES, StrategyError
from edgetts.timing import Deadline


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
    messages: tuple | None = None  # a chat request's whole conversation (the question is its last user turn)
    include_reasoning: bool = False  # return the winning row's reasoning as reasoning_content
    arrived: float = field(default_factory=time.perf_counter)  # its first bytes (perf_counter s)
    deadline: Deadline = field(init=False)  # from ``arrived`` and ``deadline_ms``: admission to the last step

    def __post_init__(self):
        self.deadline = Deadline(self.arrived, self.deadline_ms)

    @property
    def expert(self) -> bool:
        return bool(self.strategy or self.n or self.budget)


@dataclass(frozen=True)
class Plan:
    """What will run for a request: the policy's choice and the strategy, n and budget actually used."""

    choice: Selection
    strategy: str
    n: int
    budget: int
    solo_ms: float = 0.0  # the policy's prediction for what runs, alone (an expert's larger n or budget scale it)
    predicted_ms: float = 0.0  # at admission, beside the requests already running (with the margin)
    deadline: Deadline | None = None  # the request's, once admitted
    alone: bool = False  # nothing else was admitted when it was
    order: int = 0  # requests the server admitted before it
    price: float = 0.0  # the price on compute its point was chosen under

    @property
    def point(self) -> dict:
        return self.choice.point

    @property
    def end(self) -> float:
        """When its strategy must be done (:attr:`Deadline.end`; never, before admission)."""
        return math.inf if self.deadline is None else self.deadline.end

    @property
    def as_profiled(self) -> bool:
        """The point runs as profiled, so its latency may recalibrate the policy."""
        p = self.point
        return (self.strategy, self.n, self.budget) == (p["strategy"], p["n"], p["budget"])


class Late(Exception):
    """The engine dropped the request unstarted: it waited until its deadline left no room to answer."""

    def __init__(self, waited_ms: float):
        super().__init__(f"waited {waited_ms:.0f} ms in the engine's queue; too little time was left to answer")
        self.waited_ms = waited_ms


def make_plan(policy: Policy, req: Request, budget_ms: float, max_n: int, max_budget: int, cost=None,
              price: float = 0.0, charge=None) -> Plan:  # fmt: skip
    """The plan for ``req`` given ``budget_ms`` of time; expert overrides win over the point.

    ``cost(point)`` predicts a point's latency where it will run (default: the policy's, alone);
    ``price`` is the price on compute the policy weighs it with, on ``charge(point)`` where given
    (:meth:`Policy.select`).
    """
    choice = policy.select(budget_ms, cost=cost, price=price, charge=charge)
    p = choice.point
    strategy = req.strategy or p["strategy"]
    if strategy not in STRATEGIES:
        raise StrategyError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if req.strategy and STRATEGIES[strategy].single_row and req.n is not None and req.n > 1:
        raise StrategyError(f"strategy {strategy} runs one row; n={req.n} would be ignored (drop it, or use "
                            "majority, esc...)")  # fmt: skip
    # A one-row strategy runs one row whatever n the point or the request has, and says so.
    n = 1 if STRATEGIES[strategy].single_row else req.n or p["n"]
    if n > max_n:
        raise StrategyError(f"n must be at most {max_n} on this server, got {n}")
    budget = req.budget or p["budget"]
    if budget > max_budget:  # engines are sized for the frontier's largest budget
        raise StrategyError(f"budget must be at most {max_budget} on this server, got {budget}")
    if req.max_tokens:
        budget = min(budget, req.max_tokens)
    # What others wait for: the point's time alone, scaled up by the budget and rows an expert asks
    # beyond it (never down: rows that stop early and fixed costs per step do not shrink with them).
    solo = policy.predicted_ms(p) * max(1.0, budget / p["budget"]) * max(1.0, n / p["n"])
    return Plan(choice, strategy, n, budget, solo, choice.predicted_ms)
