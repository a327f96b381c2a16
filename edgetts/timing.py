"""The deadline path's timing constants, each with why it has its value, in one place.

Admission (:mod:`edgetts.runtime.planning`, :mod:`edgetts.runtime.executor`), the shared batch
(:mod:`edgetts.engines.batching`) and the controllers of strategies
(:mod:`edgetts.strategies.base`) all read them here; ``edgetts build-c`` writes the ones the C
runtime shares into its build (``edgetts_constants.h``), so Python and C cannot drift apart.
"""

from __future__ import annotations

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
OVERHEAD_MS = 2.0 + OUTSIDE_MS  # per request, outside the engine (HTTP parsing, thread hand-offs, the client)
# Strategies stop within one decode step after their deadline; that step, the time to build the
# response and the time outside the server are kept inside the request's deadline as a reserve.
RESERVE_MS, RESERVE_SHARE = 3.0 + OUTSIDE_MS, 0.1

# -- the shared batch's model of itself (engines.batching) ---------------------------------------
# Rows a batched round holds when work is judged: rounds are kept small while an urgent request
# runs, so each row pays a share of a small round's fixed cost.
SHARE_ROWS = 8
