"""The device's speed as the shared batch measures it, round after round.

:class:`StepCost` fits what a round of the running batch costs (``a + b x tokens`` seconds) online
from every round's time, cheaply enough to update each round.  :class:`DeviceSpeed` compares each
round with the fit frozen once serving has warmed up (the device as the server found it, as it
was profiled): the smoothed ratio is how much slower the device runs now (it throttles, or other
work shares its cores), and what a round took beyond that goes to
:class:`~edgetts.engines.stalls.Stalls`, the wait a short request should expect to meet.  The
scheduler (:mod:`edgetts.engines.batching`) feeds both and answers admission with them.
"""

from __future__ import annotations

import math
import time

from edgetts.engines.stalls import Stalls, fade


class StepCost:
    """``a + b x tokens`` seconds for a round, fitted online by least squares over exponentially
    weighted sums (about the last ``window`` rounds count), both parts kept non-negative: an update
    is a few float operations, where a solve over hundreds of kept samples cost the scheduler's
    thread 5% of its time under load."""

    def __init__(self, window: int = 400):
        self.keep = 1.0 - 1.0 / window
        self.n = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        k = self.keep
        self.n, self.x, self.y = k * self.n + 1.0, k * self.x + x, k * self.y + y
        self.xx, self.xy = k * self.xx + x * x, k * self.xy + x * y

    def fit(self) -> tuple[float, float]:
        if self.n <= 0:
            return 0.0, 0.0
        spread = self.n * self.xx - self.x * self.x
        if spread <= 1e-9 * self.n * self.xx:  # one width only: no slope to see
            return self.y / self.n, 0.0
        b = (self.n * self.xy - self.x * self.y) / spread
        a = (self.y - b * self.x) / self.n
        if b < 0:
            return self.y / self.n, 0.0
        if a < 0:
            return 0.0, self.xy / self.xx
        return a, b


class DeviceSpeed:
    """How much slower the device runs rounds now than it did when serving began (1: as fast), and
    how long its stalls are.

    Every round's seconds are compared with what a reference fit predicts for its tokens: the
    online fit frozen after the first ``WARM`` rounds served (the device as the server found it,
    which is how it was profiled).  The ratio is smoothed over time: a device that throttles, or
    that other work starts to share, is followed within a fraction of a second (``TAU_UP_S``: every
    request admitted meanwhile is predicted at the old speed, and a level of load can turn over in
    a second), one that gets faster again more surely (``TAU_S``); with no rounds it fades back
    toward 1 (``IDLE_S``): a slowdown that nothing measures any more is forgotten with time, never
    with refusals.  What a round took beyond the smoothed prediction goes to
    :class:`~edgetts.engines.stalls.Stalls`: a mean slowdown hides the waits for the CPU that a
    short request meets, and admission adds one to every prediction.
    """

    WARM, TAU_UP_S, TAU_S, IDLE_S = 200, 0.25, 1.0, 5.0

    def __init__(self):
        self.rounds, self.reference, self.value, self.last = 0, None, 1.0, time.perf_counter()
        self.stalls = Stalls()

    def add(self, tokens: int, seconds: float, fit: tuple[float, float]) -> None:
        now = time.perf_counter()
        self.rounds += 1
        if self.reference is None:
            if self.rounds >= self.WARM:
                self.reference = fit
            self.last = now
            return
        a, b = self.reference
        expected = a + b * tokens
        if expected > 0:
            ratio = min(seconds / expected, 20.0)  # one round stalled by a page fault must not dominate
            tau = self.TAU_UP_S if ratio > self.value else self.TAU_S  # slower: followed at once; faster: surely
            self.value += (ratio - self.value) * (1.0 - math.exp(-(now - self.last) / tau))
            self.stalls.add(seconds - expected * self.value)
        self.last = now

    def slowdown(self) -> float:
        return 1.0 + max(0.0, self.value - 1.0) * fade(time.perf_counter() - self.last, self.TAU_S, self.IDLE_S)

    def stall_s(self) -> float:
        """A wait beyond the mean slowdown that a request should expect to meet (see the class doc)."""
        return self.stalls.stall_s()
