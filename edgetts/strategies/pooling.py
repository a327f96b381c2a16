"""Estimating a strategy's cell from a pool of rows, without sampling again (pooled profiling).

A pool is, for one problem and one thinking budget, the rows a direct run would draw with
seeds ``0, 1, 2, ...``: for each, the answer a run capped at that budget gives, the tokens it
samples, its thinking tokens and whether its answer was forced (:class:`PoolSample`).  A
strategy that can be estimated from such a pool sets ``pooled = True`` and implements two
class methods over it (see :class:`~edgetts.strategies.base.Strategy`):

* ``pool_estimate(n, samples, verdicts, rng)``: expected correctness, tokens and rows of the
  strategy at parallelism ``n`` (an :class:`Estimate`), ``verdicts`` mapping each distinct
  answer to whether it is correct;
* ``pool_rounds(n, samples)``: the rounds of rows a direct run would decode (its first seeds
  in order), which the step-time model turns into a latency.

The functions here are those estimators for the shipped strategies; a new strategy picks one
or writes its own, and pooled profiling needs no change.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgetts.strategies import aggregate as agg

SUBSETS = 100  # random n-subsets (or orderings) averaged per estimate


@dataclass(frozen=True)
class PoolSample:
    answer: str | None
    steps: int  # sampled tokens (thinking + answer)
    thinking: int
    forced: bool  # the answer was forced by the budget


@dataclass(frozen=True)
class Estimate:
    correct: float  # expected correctness in [0, 1]
    tokens: float  # expected sampled tokens over all rows used
    thinking: float
    rows_used: float


Rounds = list[list[PoolSample]]


def mean_of_rows(samples: Sequence[PoolSample], verdicts: dict) -> Estimate:
    """One row: the pool's mean."""
    k = len(samples)
    return Estimate(sum(verdicts[s.answer] for s in samples) / k, sum(s.steps for s in samples) / k,
                    sum(s.thinking for s in samples) / k, 1.0)  # fmt: skip


def expected_vote(n: int, samples: Sequence[PoolSample], verdicts: dict, rng: random.Random) -> Estimate:
    """A majority vote of ``n`` rows: its expected correctness over random ``n``-subsets."""
    answers = [s.answer for s in samples]
    if n >= len(answers):
        ok = float(verdicts.get(agg.majority_vote(answers).answer, False))
    else:
        ok = sum(verdicts.get(agg.majority_vote(rng.sample(answers, n)).answer, False)
                 for _ in range(2 * SUBSETS)) / (2 * SUBSETS)  # fmt: skip
    mean = mean_of_rows(samples, verdicts)
    return Estimate(ok, n * mean.tokens, n * mean.thinking, float(n))


def first_finisher(n: int, samples: Sequence[PoolSample], verdicts: dict) -> Estimate:
    """The shortest of ``n`` rows wins, exactly over all ``n``-subsets.

    The k-th shortest row wins when the other n-1 come from the rows after it, with probability
    C(N-1-k, n-1) / C(N, n); every row runs until the winner finishes.
    """
    order = sorted(range(len(samples)), key=lambda i: (samples[i].steps, i))
    total = math.comb(len(samples), n)
    ok = tok = think = 0.0
    for k, i in enumerate(order):
        w = math.comb(len(samples) - 1 - k, n - 1) / total
        ok += w * verdicts[samples[i].answer]
        tok += w * n * samples[i].steps
        think += w * n * samples[i].thinking
    return Estimate(ok, tok, think, float(n))


def replay_rounds(n: int, samples: Sequence[PoolSample], verdicts: dict, rng: random.Random,
                  sizes: Callable[[int], list[int]], stop) -> Estimate:  # fmt: skip
    """A vote drawn in rounds (``sizes(n)``, stopping when ``stop(used, last_round)``) on random orderings."""
    ok = tok = think = used = 0.0
    for _ in range(SUBSETS):
        idx = rng.sample(range(len(samples)), n)
        answers = [samples[i].answer for i in idx]
        k = agg.replay_rounds(answers, sizes(n), stop)
        ok += verdicts.get(agg.majority_vote(answers[:k]).answer, False)
        tok += sum(samples[i].steps for i in idx[:k])
        think += sum(samples[i].thinking for i in idx[:k])
        used += k
    return Estimate(ok / SUBSETS, tok / SUBSETS, think / SUBSETS, used / SUBSETS)


def rounds_used(n: int, samples: Sequence[PoolSample], sizes: Callable[[int], list[int]], stop) -> Rounds:
    """The rounds a direct run of a round-based vote decodes on the first ``n`` rows."""
    first = list(samples[:n])
    k = agg.replay_rounds([s.answer for s in first], sizes(n), stop)
    out, start = [], 0
    for size in sizes(n):
        if start >= k:
            break
        out.append(first[start : start + size])
        start += size
    return out
