"""Pooled mode: one pool of long rows per problem answers every (strategy, n, budget) cell.

Per problem, ``n_max`` rows are sampled once at the largest budget.  Whenever a row that is
still thinking reaches a smaller budget ``b``, a probe branches it there (the engine's
``Control.probe``: the end of thinking and the answer prefix are forced in a scratch copy of
the row's cache, the answer decoded, the branch dropped), so the row itself goes on
undisturbed.  Each row thus tells, for every budget, the answer it would have given if cut
there (its natural answer when it ended its reasoning earlier) and how many tokens that took.
Row ``i`` has the same seed as row ``i`` of a direct run, so it samples the same thinking
tokens; only the answer after a cut is drawn from a separate (seeded) sampler.

Cells are derived from the pool without new sampling, by the strategy's own estimator
(``Strategy.pool_estimate`` and ``Strategy.pool_rounds``, built on
:mod:`edgetts.strategies.pooling`): single as the pool mean, majority as the expected vote over
``n``-subsets, ESC and Adaptive-Consistency by replaying their stopping rules on random
orderings, First Finish exactly over all ``n``-subsets.  Nothing here names a strategy.

Latency comes from a step-time model (:mod:`edgetts.profiling.latency`) applied to the rows a
direct run would use (the first ``n`` seeds, in order).  Strategies that are not ``pooled``
(they change what is sampled or need per-row scores) are measured directly by the runner, and
so is every cell on an engine without probes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from edgetts.engines.base import Control, SamplingParams
from edgetts.strategies import STRATEGIES
from edgetts.strategies.base import BudgetController, RunConfig
from edgetts.strategies.pooling import PoolSample
from edgetts.tasks.grading import extract_answer, is_equivalent


@dataclass
class PoolRow:
    answers: dict[int, str | None]  # budget -> answer a run capped at that budget would give
    steps: dict[int, int]  # budget -> sampled tokens (thinking + answer) that run would take
    forced: dict[int, bool]  # budget -> whether that run would have forced the answer
    thinking: dict[int, int]  # budget -> thinking tokens of that run


class _PoolController(BudgetController):
    probe_budgets: tuple[int, ...] = ()

    def on_step(self, ctl: Control, stepped: list[int]) -> None:
        for i in stepped:
            r = ctl.rows[i]
            if r.finished or i in self.answer_start or i in ctl.pending:
                continue
            t = r.n_generated
            if t in self.probe_budgets:
                ctl.probe(i, self.family.think_end + self.family.answer_prefix, self.cfg.answer_tokens,
                          label=t, seed=(r.seed * 1_000_003 + t) & 0xFFFFFFFF)  # fmt: skip


def sample_pool(engine, family, prompt: str, n_max: int, budgets: list[int], sampling: SamplingParams,
                answer_tokens: int = 32):  # fmt: skip
    """(pool rows, time to first token, prompt tokens) for one problem."""
    import time

    top = max(budgets)
    cfg = RunConfig(n=n_max, budget=top, answer_tokens=answer_tokens, sampling=sampling)
    t0 = time.perf_counter()
    ctl = _PoolController(engine, family, cfg, t0, None, prompt_tokens=engine.count_tokens(prompt) + 1)
    ctl.probe_budgets = tuple(b for b in budgets if b < top)
    params = replace(sampling, max_tokens=top + answer_tokens, logprobs=None)
    res = engine.sample(prompt, n_max, params, controller=ctl)
    pool = []
    for r in res.rows:
        natural_end = r.index in ctl.answer_start and r.index not in ctl.forced_answer
        thinking = ctl.thinking_tokens(r)
        final = extract_answer(r.text, family.think_start, family.think_end)
        answers, steps, forced, think = {}, {}, {}, {}
        for b in budgets:
            if b in r.probes:
                text, k = r.probes[b]
                answers[b] = extract_answer(text, family.think_start, family.think_end)
                steps[b], forced[b], think[b] = b + k, True, b
            else:  # ended before b, or b is the pool's own budget
                answers[b], steps[b], think[b] = final, r.n_generated, min(thinking, b)
                forced[b] = not natural_end and b == top
        pool.append(PoolRow(answers, steps, forced, think))
    return pool, res.ttft, res.prompt_tokens


def at_budget(pool: list[PoolRow], b: int) -> list[PoolSample]:
    return [PoolSample(p.answers[b], p.steps[b], p.thinking[b], p.forced[b]) for p in pool]


def cell_estimate(strategy: str, n: int, b: int, pool: list[PoolRow], gold: str, rng: random.Random) -> dict:
    """Expected correctness and tokens of one cell on one problem."""
    samples = at_budget(pool, b)
    verdicts = {a: is_equivalent(a, gold) for a in {s.answer for s in samples}}  # few distinct: grade each once
    est = STRATEGIES[strategy].pool_estimate(n, samples, verdicts, rng)
    return {"correct": est.correct, "tokens": est.tokens, "thinking": est.thinking, "rows_used": est.rows_used}


def direct_rows(strategy: str, n: int, b: int, pool: list[PoolRow]) -> list[list[tuple[int, bool]]]:
    """Rounds of (steps, forced) for the rows a direct run would decode (seeds 0..n-1, in order)."""
    rounds = STRATEGIES[strategy].pool_rounds(n, at_budget(pool, b))
    return [[(s.steps, s.forced) for s in rows] for rows in rounds]
