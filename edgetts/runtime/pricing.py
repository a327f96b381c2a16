"""A price on compute that holds a mean budget per request (milliseconds, or joules on a battery).

:meth:`edgetts.runtime.Policy.select` takes a ``price`` (accuracy per unit of cost) and chooses
the point that maximizes accuracy minus price x cost.  :class:`MeanBudget` sets that price so
that the running mean cost per request stays at a budget: after each request it moves the
price in log space by a step proportional to how far the recent mean is from the budget
(``mean / budget - 1``, clipped), so

* above the budget the price rises (cheaper points are chosen), below it the price falls;
* at a steady load the error goes to zero and so does the step: no oscillation between two
  points, only the small moves the noise of the recent mean makes;
* a price that falls below ``FLOOR`` is 0 (the most accurate point that fits), and a price
  at 0 that must rise starts from ``FLOOR``.
* the price stops at a ceiling (``MeanSpend``: ``CEILING`` times the price from which the
  cheapest point wins on its profile, :func:`cheapest_price`): under a budget that nothing
  meets it would otherwise rise without end (to infinity in about 1,500 requests), and come back
  as slowly once the budget can be met again.

The recent mean is exponentially weighted over about ``window`` requests, so a budget is held
over the last few dozen requests rather than since the start (a long quiet spell does not buy
a burst of expensive points).  :class:`MeanSpend` is what ``serve`` and ``edgetts run -`` hold:
a :class:`MeanBudget` fed each answer's latency, or on a battery the energy the device drew
since the previous answer.

:class:`LoadPrice` is ``serve --load-price``: a price on engine time set by how much of the
engine's time the admitted requests have asked for lately, the same for every request whatever
its deadline (a load judged against each request's own time left priced the long deadlines at
nearly 0, and their 8-row points then took the engine from the short ones).
"""

from __future__ import annotations

import math
import threading
import time


class MeanBudget:
    FLOOR = 1e-5  # accuracy per unit: below this a price is 0
    STEP = 0.5  # the log-price moves by at most this per request (a factor of about 1.65)
    WINDOW = 20  # requests the recent mean weighs (the C runtime's too: build-c writes these three)

    def __init__(self, budget: float, window: int = WINDOW, gain: float = 1.0, ceiling: float = math.inf):
        if not (budget > 0 and math.isfinite(budget)):
            raise ValueError(f"the mean budget must be a finite number > 0, got {budget!r}")
        self.budget, self.gain, self.ceiling = budget, gain, ceiling
        self.keep = 1.0 - 1.0 / max(1, window)
        self.mean: float | None = None
        self.price = 0.0
        self.lock = threading.Lock()

    def observe(self, cost: float) -> float:
        """Count one request's cost (ms or J); returns the price for the next one."""
        if not (cost >= 0 and math.isfinite(cost)):
            return self.price  # a cost that was not measured moves nothing
        with self.lock:
            self.mean = cost if self.mean is None else self.keep * self.mean + (1 - self.keep) * cost
            error = max(-1.0, min(1.0, self.mean / self.budget - 1.0))
            step = max(-self.STEP, min(self.STEP, self.gain * error))
            if self.price == 0.0:
                if error > 0:
                    self.price = self.FLOOR
                return self.price
            # Never past the ceiling, where no choice changes any more: under a budget nothing meets, a price
            # rising for ever (to infinity after about 1,500 requests) would take as long to come back.
            self.price = min(self.price * math.exp(step), max(self.ceiling, self.FLOOR))
            if self.price < self.FLOOR:
                self.price = 0.0
            return self.price


class LoadPrice:
    """The price on engine time in a server, from its load: each admitted request adds the engine time its
    point holds (``work_ms``) to a sum that decays exponentially with ``TAU_S``, so at a steady rate of
    ``r`` engine-ms asked per second the sum settles at ``r x TAU_S`` and :meth:`load` (the sum over
    ``TAU_S`` in ms) at ``r / 1000``: 1 when the requests ask for all of the engine's time, falling to 0
    within a few ``TAU_S`` of idleness.  The price is 0 up to a load of ``FREE`` (the most accurate
    point that fits), rises linearly to ``SHARE`` x the ``efficient`` price at ``FULL`` and stays
    there: the point with the most accuracy per engine-ms would be chosen at the whole efficient price
    (on the tiny model the least accurate point, for every request), so at a fifth of it an engine-ms
    spent beyond a cheaper point must buy a fifth of that point's accuracy per engine-ms.  The price
    lowers the load it is set from (cheaper points hold less), so it settles where the two agree
    instead of swinging.
    """

    # Measured on the tiny model (bench/price.py --serve, BENCHMARKS.md): bounds of 0.3-0.8 did about as
    # well at twice the sequential capacity; with the rule before (a load against each request's own time
    # left), ceilings from 0.05 to 1 of the efficient price did no better than a fifth.
    FREE, FULL, SHARE = 0.2, 0.6, 0.2
    TAU_S = 0.5  # tens of requests under load: a few of them do not swing it; a burst is seen within it

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.sum_ms, self.at = 0.0, clock()
        self.lock = threading.Lock()

    def admitted(self, work_ms: float) -> None:
        """Count an admitted request that holds ``work_ms`` of engine time."""
        if not (work_ms >= 0 and math.isfinite(work_ms)):
            return
        with self.lock:
            now = self.clock()
            self.sum_ms = self._decayed(now) + work_ms
            self.at = now

    def load(self) -> float:
        """The share of the engine's time asked for lately (1: all of it; more: more than it has)."""
        with self.lock:
            return self._decayed(self.clock()) / (1000 * self.TAU_S)

    def price(self, efficient: float) -> float:
        """The price in force, ``efficient`` being the price at which the most efficient point is chosen."""
        ramp = (self.load() - self.FREE) / (self.FULL - self.FREE)
        return self.SHARE * efficient * min(1.0, max(0.0, ramp))

    def _decayed(self, now: float) -> float:
        return self.sum_ms * math.exp(-max(0.0, now - self.at) / self.TAU_S)


class MeanSpend:
    """A mean budget held over the answers a runtime gives (``serve``, ``edgetts run -``): each answer costs
    its latency (ms), or with ``joules`` the energy the device drew since the previous answer (J), so that
    over any stretch the costs add up to what the battery gave, idle time and concurrent requests
    included; :class:`MeanBudget` turns the costs into the price, which weighs each point's predicted
    latency, or its profiled ``energy_j`` (:meth:`charge`).

    With ``joules``, every frontier point must say what it draws and this device must have a meter
    (one-line :class:`~edgetts.pareto.config.ParetoError` / ``MeterUnavailable`` otherwise).
    """

    def __init__(self, frontier: list[dict], budget: float, joules: bool = False, price: float = 0.0):
        self.target = MeanBudget(budget, ceiling=CEILING * cheapest_price(frontier, "energy_j" if joules else
                                                                          "latency_ms"))  # fmt: skip
        self.target.price = price
        self.energy = _energy_counter(frontier) if joules else None
        self.drawn = self.energy.joules() if self.energy else 0.0  # the counter's reading at the last answer
        self.lock = threading.Lock()

    @property
    def price(self) -> float:
        return self.target.price

    def observe(self, latency_ms: float) -> float:
        """Count one answer (it took ``latency_ms``); returns the price for the next one."""
        if self.energy is None:
            return self.target.observe(latency_ms)
        with self.lock:
            now = self.energy.joules()
            cost, self.drawn = now - self.drawn, now
        return self.target.observe(cost)

    def charge(self):
        """What the price multiplies: each point's profiled energy with ``joules``, else None (its latency)."""
        return (lambda point: point["energy_j"]) if self.energy is not None else None

    def close(self) -> None:
        if self.energy is not None:
            self.energy.close()


# The ceiling of a held budget's price, over the price from which the cheapest point is chosen by its profile:
# a server's costs (beside the batch) and a slower device shift where the choices change, not by this much.
CEILING = 10.0


def cheapest_price(frontier: list[dict], cost: str) -> float:
    """The price from which the cheapest point (by ``cost``) is worth the most of the frontier: each point's
    accuracy over the cheapest's, per unit of its cost over the cheapest's, at most (0: no point costs more)."""
    known = [(p[cost], p["accuracy"]) for p in frontier if isinstance(p.get(cost), int | float) and p[cost] >= 0]
    if not known:
        return 0.0
    c0, a0 = min(known, key=lambda x: (x[0], -x[1]))
    return max([(a - a0) / (c - c0) for c, a in known if c > c0 and a > a0], default=0.0)


def _energy_counter(frontier: list[dict]):
    from edgetts.pareto.config import ParetoError
    from edgetts.telemetry.meters import EnergyCounter

    bare = [p["id"] for p in frontier if not (isinstance(p.get("energy_j"), int | float) and
                                              0 < p["energy_j"] < math.inf)]  # fmt: skip
    if bare:
        raise ParetoError(f"--mean-j prices energy, and {len(bare)} frontier point(s) have no energy_j "
                          f"({', '.join(bare[:3])}): profile where an energy meter exists")  # fmt: skip
    return EnergyCounter()
