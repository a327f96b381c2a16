"""The selection policy over a Pareto config, with online recalibration.

    policy = Policy.load("configs/tiny.json")
    choice = policy.select(deadline_ms=40, energy_j=None, memory_mb=None)
    ...run choice.point...
    policy.observe(choice.point["id"], measured_ms)

:meth:`Policy.select` returns the most accurate point whose predicted latency fits the
deadline (and whose energy and memory fit, when limits are given); ties go to the faster
point.  With a ``price`` on compute (accuracy per millisecond), the point that fits and
maximizes accuracy minus price times its predicted latency is chosen instead; price 0 is the
rule above exactly.  When nothing fits it returns the fastest point that satisfies the other
limits (or the fastest point at all), flagged ``miss=True``.  :meth:`check_deadline` is the refusal rule
every runtime applies first: a deadline the fastest point cannot meet even on an idle device is
the caller's error.

Predicted latency is the profiled quantile (p95 by default) times a device-wide slowdown
factor.  :meth:`observe` keeps the last ``RUNS`` runs' latencies over their point's profiled
*median*, and the slowdown is the median of those ratios, never below 1.  Against the median,
an ordinary run of any point counts about 1 on the profiled device, whatever the spread of its
latencies (an average against the p95 would sink far below 1 on ordinary runs: Early-Stopping
Consistency's median is a quarter of its p95, and the policy would then pick points that run
late); one long run cannot move a median; a throttled device is followed within a few runs,
and a recovered one as soon as half of the kept runs are back.  :meth:`relax` counts a run at
the profile when nothing has been measured for a second (a server that refuses everything
measures nothing, and must find out that the device is fast again).  The C runtime
(``edgetts_policy_observe``) keeps the same runs and takes the same median.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edgetts.pareto.config import load_config, validate


class DeadlineTooShort(ValueError):
    """A deadline that no point meets even on an idle device: the caller's error, not load's.
    ``fastest_ms`` is what the fastest point (within the limits) needs."""

    def __init__(self, message: str, fastest_ms: float):
        super().__init__(message)
        self.fastest_ms = fastest_ms


@dataclass(frozen=True)
class Selection:
    index: int  # position in the config's frontier
    point: dict
    predicted_ms: float
    miss: bool  # nothing fitted the deadline (and limits): this is the fastest fallback


class Policy:
    RUNS = 15  # runs whose median is the slowdown (edgetts/native/runtime.c: ETT_RUNS)
    RELAX_S = 1.0  # with no run observed this long, a refusal counts a run at the profile (relax)
    clock = staticmethod(time.perf_counter)  # seconds, for relax (tests give an instance its own)

    def __init__(self, config: dict):
        self.config = validate(config)
        self.frontier = config["frontier"]
        self.by_id = {p["id"]: i for i, p in enumerate(self.frontier)}
        self.slowdown = 1.0
        self.runs: deque[float] = deque(maxlen=self.RUNS)
        self.last_seen = self.clock()  # when a run was last counted

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        return cls(load_config(path))

    def predicted_ms(self, point: dict) -> float:
        return point["latency_ms"] * self.slowdown

    def select(self, deadline_ms: float, energy_j: float | None = None, memory_mb: float | None = None,
               cost=None, price: float = 0.0, charge=None) -> Selection:  # fmt: skip
        """The point that fits and maximizes accuracy minus ``price`` times its predicted milliseconds
        (price 0: the most accurate that fits); ``cost(point)`` may replace the prediction (the
        server's: the point beside the requests already running), and ``charge(point)`` what the price
        multiplies (the server's load price: the engine time the point would hold in the shared batch;
        default the predicted milliseconds).  The same rule, in the same floating-point operations, is
        ``edgetts_policy_select`` with ``edgetts_set_price`` in C (which has no batch: no ``charge``)."""
        if not (price >= 0 and math.isfinite(price)):
            raise ValueError(f"price must be a finite number >= 0, got {price!r}")
        predict = cost or self.predicted_ms

        def within_limits(p):
            if energy_j is not None and energy_j > 0 and (p.get("energy_j") is None or p["energy_j"] > energy_j):
                return False
            return not (memory_mb is not None and (p.get("memory_mb") is None or p["memory_mb"] > memory_mb))

        known: dict[int, float] = {}  # a server's prediction weighs the whole batch: once per point

        def ms(i: int) -> float:
            if i not in known:
                known[i] = predict(self.frontier[i])
            return known[i]

        def worth(i: int) -> float:  # accuracy less the price of the time it takes
            return self.frontier[i]["accuracy"] - price * (ms(i) if charge is None else charge(self.frontier[i]))

        best = None
        for i, p in enumerate(self.frontier):
            fits = within_limits(p) and ms(i) <= deadline_ms
            if fits and (best is None or worth(i) > worth(best)):  # ties: the faster (frontier order)
                best = i
        if best is not None:
            return Selection(best, self.frontier[best], ms(best), False)
        fallback = next((i for i, p in enumerate(self.frontier) if within_limits(p)), 0)
        return Selection(fallback, self.frontier[fallback], ms(fallback), True)

    def check_deadline(self, deadline_ms: float, energy_j: float | None = None, require=None) -> None:
        """Refuse (:class:`DeadlineTooShort`) a deadline shorter than the fastest point needs on an idle
        device: its profiled latency (``require(latency)`` where the caller adds what it adds, as the
        server adds its margin and reserve), whatever the slowdown.  One rule for ``run --config``, ``serve``
        (400, not retried) and the C runtime (``EDGETTS_E_DEADLINE``); a deadline that only load or a
        throttled device prevents is not refused here."""
        limited = [p for p in self.frontier if not (energy_j is not None and energy_j > 0 and
                                                    (p.get("energy_j") is None or p["energy_j"] > energy_j))]
        fastest = min(limited or self.frontier, key=lambda p: p["latency_ms"])
        need = require(fastest["latency_ms"]) if require else fastest["latency_ms"]
        if deadline_ms < need:
            raise DeadlineTooShort(f"deadline_ms={deadline_ms:g} is shorter than the fastest point needs on an idle "
                                   f"device ({fastest['id']}: {need:.0f} ms); give a deadline of at least that",
                                   need)  # fmt: skip

    def observe(self, point_id: str, latency_ms: float) -> None:
        """Report a measured latency of a point: the slowdown becomes the median, over the last
        ``RUNS`` runs, of latency over the point's profiled median (its ``latency_ms`` when the
        config has no quantiles), and never below 1: the device was profiled as it is."""
        i = self.by_id.get(point_id)
        if i is None or not 0 < latency_ms < math.inf:  # also NaN
            return
        p = self.frontier[i]
        typical = (p.get("latency_quantiles_ms") or {}).get("p50") or p["latency_ms"]
        self._count(latency_ms / max(typical, 1e-9))

    def relax(self) -> None:
        """Count a run at the profile once no run has been observed for ``RELAX_S`` seconds (a server's
        refusal, which measures nothing), at most once per ``RELAX_S``.

        Without it a factor raised by a few slow requests would refuse every later request, and
        refused requests never run to measure that the device is fast again; with time, not with
        each refusal, so that a burst of refusals does not wipe out what runs just measured.
        """
        if self.clock() - self.last_seen >= self.RELAX_S:
            self._count(1.0)

    def _count(self, ratio: float) -> None:
        self.runs.append(ratio)
        self.slowdown = max(1.0, statistics.median(self.runs))
        self.last_seen = self.clock()
