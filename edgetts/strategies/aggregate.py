"""Pure aggregation over finished rows: votes, weights, confidences and early-stopping tests.

Nothing here touches an engine; every function takes answers (``None`` for a row without
a valid answer) and, where needed, per-row numbers, so each is unit-testable in isolation.

* :func:`majority_vote`: self-consistency (Wang et al.); invalid answers are dropped and
  ties go to the answer that reached the top count first (deterministic).
* :func:`weighted_vote`: the same with per-row weights (confidence-weighted voting).
* :func:`mean_confidence`, :func:`lowest_window_confidence`: DeepConf's trace confidences from
  token log-probabilities: the mean, and the lowest mean over a sliding window ("group").
* :func:`adaptive_should_stop`: Adaptive-Consistency's Beta stopping rule: stop once the
  posterior probability that the leading answer is truly more frequent than the runner-up
  exceeds a threshold.
* :func:`esc_should_stop`: Early-Stopping Self-Consistency: stop when the latest window of
  samples is unanimous.
* :func:`adaptive_rounds`, :func:`esc_rounds`, :func:`replay_rounds`: how those two draw rows in
  rounds, shared by the strategies and by pooled profiling's replay of them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Vote:
    answer: str | None
    tally: dict[str, float]  # answer -> votes (or summed weights), in first-seen order
    valid: int  # rows that had an answer


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> Vote:
    """Answer with the largest total weight; ties go to the answer seen first."""
    weights = [1.0] * len(answers) if weights is None else list(weights)
    if len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    tally: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            tally[a] = tally.get(a, 0.0) + w
    if not tally:
        return Vote(None, {}, 0)
    best = max(tally.values())
    winner = next(a for a, v in tally.items() if v == best)
    return Vote(winner, tally, sum(a is not None for a in answers))


def majority_vote(answers: Sequence[str | None]) -> Vote:
    return weighted_vote(answers)


def mean_confidence(logprobs: Sequence[float]) -> float:
    """Mean token log-probability of a trace (higher is more confident); -inf when empty."""
    return sum(logprobs) / len(logprobs) if logprobs else -math.inf


def lowest_window_confidence(logprobs: Sequence[float], window: int = 16) -> float:
    """Lowest mean log-probability over any ``window`` consecutive tokens (DeepConf's lowest group)."""
    if not logprobs:
        return -math.inf
    w = min(window, len(logprobs))
    s = sum(logprobs[:w])
    lowest = s
    for i in range(w, len(logprobs)):
        s += logprobs[i] - logprobs[i - w]
        lowest = min(lowest, s)
    return lowest / w


def beta_prob_leader(a: int, b: int, prior: float = 1.0) -> float:
    """P(p1 > p2) when p1/(p1+p2) ~ Beta(a + prior, b + prior): the leader truly leads.

    For integer parameters the Beta CDF at 1/2 is a binomial tail,
    I_{1/2}(a', b') = P(Bin(a' + b' - 1, 1/2) >= a'), so P(p > 1/2) = P(Bin <= a' - 1):
    exact, and no SciPy is needed.
    """
    a1, b1 = a + prior, b + prior
    if not (float(a1).is_integer() and float(b1).is_integer()):
        raise ValueError("the prior must make both Beta parameters integers")
    n = int(a1 + b1 - 1)
    return sum(math.comb(n, k) for k in range(int(a1))) / 2**n


def adaptive_should_stop(answers: Sequence[str | None], threshold: float = 0.95, prior: float = 1.0) -> bool:
    """Adaptive-Consistency: stop when P(leader beats runner-up) > ``threshold``."""
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return False
    lead = counts[0][1]
    second = counts[1][1] if len(counts) > 1 else 0
    return beta_prob_leader(lead, second, prior) > threshold


def esc_should_stop(answers: Sequence[str | None], window: int = 4) -> bool:
    """ESC: stop when the last ``window`` samples all gave the same valid answer."""
    if len(answers) < window:
        return False
    last = answers[-window:]
    return last[0] is not None and all(a == last[0] for a in last)


def adaptive_rounds(n: int, start: int = 4, step: int = 2) -> list[int]:
    """Row counts of Adaptive-Consistency's rounds: ``start`` rows, then ``step`` more, up to ``n``."""
    out = [min(start, n)]
    while sum(out) < n:
        out.append(min(step, n - sum(out)))
    return out


def esc_rounds(n: int, window: int | None = None) -> list[int]:
    """Row counts of ESC's windows; the default window is a quarter of ``n`` (at least 2)."""
    w = window if window is not None else max(2, n // 4)
    full, rest = divmod(n, w)
    return [w] * full + ([rest] if rest else [])


def replay_rounds(answers: Sequence[str | None], sizes: Sequence[int], should_stop) -> int:
    """Rows a round-based vote uses on answers drawn in this order; ``should_stop(used, last_round)``."""
    used = 0
    for size in sizes:
        new = answers[used : used + size]
        used += len(new)
        if used < len(answers) and should_stop(answers[:used], new):
            break
    return used
