"""The deadline path's timing constants, each with why it has its value, in one place.

Admission (:mod:`edgetts.runtime.server`, :mod:`edgetts.runtime.planning`), the shared batch
(:mod:`edgetts.engines.batching`) and the controllers of strategies
(:mod:`edgetts.strategies.base`) all read them here, as they do a request's :class:`Deadline`,
the one object its deadline travels in from the server's first sight of it to the batch's
rounds; ``edgetts build-c`` writes the constants the C runtime shares into its build
(``edgetts_constants.h``), so Python and C cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- the forced answer (controllers, in Python and C) ------------------------------------------
ANSWER_STEPS = 8  # decode steps reserved for a forced answer ("\boxed{42}", "The answer is 383")
# Steps get slower when other requests join a shared batch, and the step estimate lags them: the
# answer is forced while this many times the reserved steps still fit, so that it is stated in time.
ANSWER_SAFETY = 1.5
# Rounds a job still needs to force and state an answer: the forced text's decode, then the answer's
# steps.  A queued job with less time left than these rounds is dropped unstarted.
ANSWER_ROUNDS = ANSWER_STEPS + 1

# -- admission (serve) ---------------------------------------------------------------------------
MARGIN = 1.25  # least safety factor on predicted latencies at admission
# Time a client counts that the server's clock does not see: its HTTP library, the connection and
# both event loops (3 ms typical and 7-11 ms at the 99th percentile with httpx on a loaded 2-core machine).
OUTSIDE_MS = 6.0
# Strategies stop within one decode step after their deadline; that step, the time to build the
# response and the time outside the server are kept inside the request's deadline as a reserve.
RESERVE_MS, RESERVE_SHARE = 3.0 + OUTSIDE_MS, 0.1
# The reserve's share is there for stalls: a row still stating its answer when the end comes (or a
# thinking row that a stall carried past the moment its answer was due) may use this part of it to state
# the answer, which cut at the end would be no answer at all: a miss whatever the clock says.
GRACE_SHARE = 0.5
# A call with no answer at all when its grace runs out (no row finished: a single row still reasoning
# after a stall beyond the one expected) comes back empty, a miss whatever the clock says.  It may go on
# into the rest of the reserve to state one, keeping the time outside the server it typically meets
# (half of OUTSIDE_MS) and a millisecond to build and write the response: an answer then may still be on
# time, where the cut never is.
RESCUE_KEEP_MS = OUTSIDE_MS / 2 + 1.0
# A deadline this large never binds (edgetts.h's EDGETTS_NO_DEADLINE): a config's policy picks the most
# accurate point for it, and the answer reports no deadline, as the C runtime's does.
NO_DEADLINE_MS = 1e300


@dataclass(frozen=True)
class Deadline:
    """A request's deadline, one object from the server's first sight of it to the shared batch's rounds.

    ``arrived`` is when the request's first bytes came in (``time.perf_counter()`` seconds), ``ms``
    the deadline its client gave.  Two instants follow, fixed at arrival:

    * :attr:`due`, when the client's deadline falls: what a response is judged on time against;
    * :attr:`end`, when the strategy must be done: ``due`` less the reserve (``RESERVE_MS`` and
      ``RESERVE_SHARE`` of the deadline) for the step a strategy may run past it, the response and the
      client's side.  Admission weighs a point's predicted time against it, the shared batch orders
      its rounds by it (earliest first) and judges the work due by it, and the controllers stop at it.
    """

    arrived: float
    ms: float

    @property
    def due(self) -> float:
        return self.arrived + self.ms / 1000

    @property
    def end(self) -> float:
        return self.due - (RESERVE_MS + RESERVE_SHARE * max(self.ms, 0.0)) / 1000

    @property
    def grace_ms(self) -> float:
        """Past :attr:`end`, the time a row may still take to state its answer (``GRACE_SHARE`` of the
        reserve's share): the strategy then stops no later than ``due`` less ``RESERVE_MS`` and the rest
        (a call with no answer yet: :attr:`rescue_ms`)."""
        return GRACE_SHARE * RESERVE_SHARE * max(self.ms, 0.0)

    @property
    def rescue_ms(self) -> float:
        """Past :attr:`end`, the time a call with no answer yet may take to state one (the reserve but
        ``RESCUE_KEEP_MS``): its own answer or none, it holds the engine a few ms longer."""
        return max(self.grace_ms, RESERVE_MS + RESERVE_SHARE * max(self.ms, 0.0) - RESCUE_KEEP_MS)

    def run_ms(self, now: float) -> float:
        """Milliseconds a strategy started at ``now`` has until :attr:`end`."""
        return 1000 * (self.end - now)

    def elapsed_ms(self, now: float) -> float:
        return 1000 * (now - self.arrived)

    @staticmethod
    def shortest_ms(run_ms: float) -> float:
        """The shortest deadline that gives a strategy starting at once ``run_ms`` before its end."""
        return (run_ms + RESERVE_MS) / (1.0 - RESERVE_SHARE)


# -- the shared batch's model of itself (engines.batching) ---------------------------------------
# Rows a batched round holds when work is judged: rounds are kept small while an urgent request
# runs, so each row pays a share of a small round's fixed cost.
SHARE_ROWS = 8
