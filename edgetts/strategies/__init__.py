"""Test-time-scaling strategies, chosen by name.

Each strategy is a :class:`~edgetts.strategies.base.Strategy` subclass: a controller over the
engine's sampling loop (budget, deadline and its own rule) plus a pure aggregation from
:mod:`edgetts.strategies.aggregate`.  :func:`create` builds one by name; names are the ones
used on the command line and in configs; :func:`register` adds one (a new strategy is one
module plus its registration: profiling reads the class's ``single_row``, ``pooled`` and pool
estimators, never its name).
"""

from __future__ import annotations

from edgetts.engines.base import Engine
from edgetts.models.families import Family
from edgetts.strategies.base import RowTrace, RunConfig, Strategy, StrategyError, Trace
from edgetts.strategies.single import BudgetForcing, FirstFinish, LengthHint, Single
from edgetts.strategies.voting import ESC, Adaptive, BestOfN, Majority, SelfLikelihood, Weighted

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (Single, BudgetForcing, LengthHint, Majority, Weighted, BestOfN, FirstFinish, Adaptive, ESC)
}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make a strategy class available by its ``name`` (to the CLI, sweeps, configs and profiling)."""
    if not cls.name:
        raise StrategyError(f"{cls.__name__} has no name")
    STRATEGIES[cls.name] = cls
    return cls


def create(name: str, engine: Engine, family: Family, cfg: RunConfig, **options) -> Strategy:
    """A strategy by name; unknown names list the valid ones."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](engine, family, cfg, **options)


__all__ = ["STRATEGIES", "RowTrace", "RunConfig", "SelfLikelihood", "Strategy", "StrategyError", "Trace", "create",
           "register"]
