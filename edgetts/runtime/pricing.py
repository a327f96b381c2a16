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

The recent mean is exponentially weighted over about ``window`` requests, so a budget is held
over the last few dozen requests rather than since the start (a long quiet spell does not buy
a burst of expensive points).
"""

from __future__ import annotations

import math
import threading


class MeanBudget:
    FLOOR = 1e-5  # accuracy per unit: below this a price is 0
    STEP = 0.5  # the log-price moves by at most this per request (a factor of about 1.65)

    def __init__(self, budget: float, window: int = 20, gain: float = 1.0):
        if not (budget > 0 and math.isfinite(budget)):
            raise ValueError(f"the mean budget must be a finite number > 0, got {budget!r}")
        self.budget, self.gain = budget, gain
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
            self.price *= math.exp(step)
            if self.price < self.FLOOR:
                self.price = 0.0
            return self.price
