"""Waits beyond what a decode step should take, as a device shared with other work shows them.

A device whose cores other processes share runs most steps at speed and some after a wait for
the CPU (a scheduler time slice: several ms).  A mean slowdown hides them, but a request with a
tight deadline meets one and is late.  :class:`Stalls` keeps the last ``COUNT`` excesses of a
step over what it should have taken (the owner says what that is: the shared batch's fitted round
cost, or a call's running step estimate on an engine that runs one call at a time) and gives their
``Q`` quantile as the stall a request should expect to meet at least once.  With no steps measured
it fades toward 0 (:func:`fade`), as a slowdown that nothing measures any more does.
"""

from __future__ import annotations

import math
import time
from collections import deque


def fade(idle_s: float, tau_s: float = 1.0, idle_tau_s: float = 5.0) -> float:
    """How much of a measure still holds after ``idle_s`` seconds with nothing measured: all of it for
    ``tau_s``, then falling with the time constant ``idle_tau_s`` (what nothing measures any more is
    forgotten with time)."""
    return math.exp(-max(0.0, idle_s - tau_s) / idle_tau_s)


class Stalls:
    # Kept excesses, the quantile given (a request of k steps meets the 1 - 1/k quantile about once: 50 steps
    # is a short request here), steps between recomputing it.
    COUNT, Q, EVERY = 256, 0.98, 16

    def __init__(self):
        self.excess: deque[float] = deque(maxlen=self.COUNT)
        self.value, self.count, self.last = 0.0, 0, time.perf_counter()
        # What the latest call's steps (per row: on a CPU a step costs about its rows) and prompt took
        # (:class:`Timed`): how long the next call needs at least to state an answer, before it starts.
        self.row_step_s, self.prefill_s = 0.0, 0.0

    def add(self, excess_s: float) -> None:
        """One step's seconds beyond what it should have taken (negative: it was quick)."""
        self.excess.append(max(0.0, excess_s))
        self.count += 1
        self.last = time.perf_counter()
        if self.count % self.EVERY == 0 or self.count < self.EVERY:  # admission reads it far more often
            ordered = sorted(self.excess)
            self.value = ordered[min(len(ordered) - 1, int(self.Q * len(ordered)))]

    def stall_s(self) -> float:
        return self.value * fade(time.perf_counter() - self.last)


class Timed:
    """A controller wrapped to measure its call's steps (the time between its calls) into ``stalls``, and to
    hand the controller the stall to expect (``Control.stall_s``): for an engine that runs one call at a
    time, where every step is the call's own and a step over its running estimate is a wait."""

    def __init__(self, controller, stalls: Stalls):
        self.inner, self.stalls, self.last, self.step = controller, stalls, None, 0.0

    def __getattr__(self, name):  # expired, due, expected_tokens...: the controller's own
        return getattr(self.inner, name)

    def __call__(self, ctl, stepped):
        now = time.perf_counter()
        if self.last is not None:
            dt = now - self.last
            if self.step:
                self.stalls.add(dt - self.step)
            self.step = dt if not self.step else 0.7 * self.step + 0.3 * dt
        elif getattr(ctl, "prefill_s", None) is not None:  # the first call follows the prompt's prefill
            self.stalls.prefill_s = ctl.prefill_s
        self.last = now
        if self.step:
            self.stalls.row_step_s = self.step / max(1, len(getattr(ctl, "rows", ())))
        ctl.stall_s = self.stalls.stall_s()
        return self.inner(ctl, stepped)
