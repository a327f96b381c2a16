"""The selection policy over a Pareto config, with online recalibration.

    policy = Policy.load("configs/tiny.json")
    choice = policy.select(deadline_ms=40, energy_j=None, memory_mb=None)
    ...run choice.point...
    policy.observe(choice.point["id"], measured_ms)

:meth:`Policy.select` returns the most accurate point whose predicted latency fits the
deadline (and whose energy and memory fit, when limits are given); ties go to the faster
point.  When nothing fits it returns the fastest point that satisfies the other limits (or
the fastest point at all), flagged ``miss=True``.

Predicted latency is the profiled quantile times a device-wide slowdown factor: every
:meth:`observe` moves an exponentially weighted average of observed/profiled latency
(``alpha`` per observation), so a throttled device drifts to cheaper points and drifts back
once observations return to their profiled values (the C runtime does the same).  The server
uses :meth:`observe_run` instead: the median of recent runs against each point's profiled
median, which the spread of a point's latencies cannot bias.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edgetts.pareto.config import load_config, validate


@dataclass(frozen=True)
class Selection:
    index: int  # position in the config's frontier
    point: dict
    predicted_ms: float
    miss: bool  # nothing fitted the deadline (and limits): this is the fastest fallback


class Policy:
    RUNS = 15  # runs whose median is the slowdown in :meth:`observe_run`

    def __init__(self, config: dict, alpha: float = 0.2):
        self.config = validate(config)
        self.frontier = config["frontier"]
        self.by_id = {p["id"]: i for i, p in enumerate(self.frontier)}
        self.alpha = alpha
        self.slowdown = 1.0
        self.runs: deque[float] = deque(maxlen=self.RUNS)

    @classmethod
    def load(cls, path: str | Path, alpha: float = 0.2) -> Policy:
        return cls(load_config(path), alpha)

    def predicted_ms(self, point: dict) -> float:
        return point["latency_ms"] * self.slowdown

    def select(self, deadline_ms: float, energy_j: float | None = None, memory_mb: float | None = None,
               cost=None) -> Selection:  # fmt: skip
        """The most accurate point whose predicted latency fits; ``cost(point)`` may replace the prediction
        (the server's: the point beside the requests already running)."""
        predict = cost or self.predicted_ms

        def within_limits(p):
            if energy_j is not None and energy_j > 0 and (p.get("energy_j") is None or p["energy_j"] > energy_j):
                return False
            return not (memory_mb is not None and (p.get("memory_mb") is None or p["memory_mb"] > memory_mb))

        best = None
        for i, p in enumerate(self.frontier):
            fits = within_limits(p) and predict(p) <= deadline_ms
            if fits and (best is None or p["accuracy"] > self.frontier[best]["accuracy"]):
                best = i
        if best is not None:
            p = self.frontier[best]
            return Selection(best, p, predict(p), False)
        fallback = next((i for i, p in enumerate(self.frontier) if within_limits(p)), 0)
        p = self.frontier[fallback]
        return Selection(fallback, p, predict(p), True)

    def observe(self, point_id: str, latency_ms: float) -> None:
        """Report a measured latency of a point; updates the slowdown factor."""
        i = self.by_id.get(point_id)
        if i is None or latency_ms <= 0:
            return
        ratio = latency_ms / max(self.frontier[i]["latency_ms"], 1e-9)
        self.slowdown = (1 - self.alpha) * self.slowdown + self.alpha * ratio

    def observe_run(self, point_id: str, latency_ms: float) -> None:
        """Report one run of a point, robustly: the slowdown becomes the median, over the last
        ``RUNS`` runs, of latency over the point's profiled median (at least 1).

        :meth:`observe` compares with the frontier's quantile (p95 by default), which a typical run
        stays well under (Early-Stopping Consistency's median is a quarter of its p95), so a steady
        stream of ordinary runs would pull the factor far below 1 and admit points that then run
        late; and one long run moves an average a lot.  The median of ratios to the median is 1 on
        the profiled device whatever the spread, and follows a real slowdown within a few runs.
        """
        i = self.by_id.get(point_id)
        if i is None or latency_ms <= 0:
            return
        p = self.frontier[i]
        typical = (p.get("latency_quantiles_ms") or {}).get("p50") or p["latency_ms"]
        self.runs.append(latency_ms / max(typical, 1e-9))
        # Never below the profile: the device was profiled as it is, and a server sees its short runs
        # alone more often than its long ones (a long run is likelier to overlap another request).
        self.slowdown = max(1.0, statistics.median(self.runs))

    def relax(self) -> None:
        """Move the slowdown one step back toward the profile (a refusal, which measures nothing).

        Without it a factor raised by a few slow requests would refuse every later request, and
        refused requests never run to measure that the device is fast again.
        """
        self.slowdown = (1 - self.alpha) * self.slowdown + self.alpha * 1.0
        if self.runs:
            self.runs.append(1.0)  # and the runs' median with it
