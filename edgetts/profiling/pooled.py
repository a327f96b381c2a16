"""Pooled mode: one pool of long rows per problem answers every (strategy, n, budget) cell.

Per problem, ``n_max`` rows are sampled once at the largest budget.  Whenever a row that is
still thinking reaches a smaller budget ``b``, a probe branches it there (the engine's
``Control.probe``: the end of thinking and the answer prefix are forced in a scratch copy of
the row's cache, the answer decoded, the branch dropped), so the row itself goes on
undisturbed.  Each row thus tells, for every budget, the answer it would have given if cut
there (its natural answer when it ended its reasoning earlier) and how many tokens that took.
Row ``i`` has the same seed as row ``i`` of a direct run, so it samples the same thinking
tokens; only the answer after a cut is drawn from a separate (seeded) sampler.

Cells are derived from the pool without new sampling:

* ``single``: mean correctness over the pool's rows;
* ``majority``: expected accuracy of a vote over ``n`` rows (random ``n``-subsets);
* ``esc`` / ``adaptive``: their stopping rules replayed on random orderings of ``n`` rows;
* ``first-finish``: the shortest row of an ``n``-subset, exactly over all subsets.

Latency comes from a step-time model (:mod:`edgetts.profiling.latency`) applied to the rows a
direct run would use (the first ``n`` seeds, in order).  Strategies that change what is sampled
(budget forcing's "Wait", the length hint) or need per-row scores (weighted, best-of-n) are not
pooled; the runner measures those cells directly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from edgetts.engines.base import Control, SamplingParams
from edgetts.evaluate import expected_majority
from edgetts.strategies import aggregate as agg
from edgetts.strategies.base import BudgetController, RunConfig
from edgetts.tasks.grading import extract_answer, is_equivalent

POOLED = ("single", "majority", "esc", "adaptive", "first-finish")
SUBSETS = 100


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


# How each round-based vote draws rows and when it stops, the same functions its strategy uses.
ROUNDS = {
    "esc": (agg.esc_rounds, lambda used, last: agg.esc_should_stop(last, len(last))),
    "adaptive": (agg.adaptive_rounds, lambda used, last: agg.adaptive_should_stop(used)),
}


def replay(strategy: str, answers: list[str | None]) -> tuple[str | None, int]:
    """(answer, rows used) of ``esc``/``adaptive`` (default options) on rows drawn in this order."""
    sizes, stop = ROUNDS[strategy]
    k = agg.replay_rounds(answers, sizes(len(answers)), stop)
    return agg.majority_vote(answers[:k]).answer, k


def cell_estimate(strategy: str, n: int, b: int, pool: list[PoolRow], gold: str, rng: random.Random) -> dict:
    """Expected correctness and tokens of one cell on one problem, and the rows a direct run uses."""
    answers = [p.answers[b] for p in pool]
    verdicts = {a: is_equivalent(a, gold) for a in set(answers)}  # few distinct answers: grade each once
    mean_steps = sum(p.steps[b] for p in pool) / len(pool)
    mean_think = sum(p.thinking[b] for p in pool) / len(pool)
    if strategy == "single":
        ok = sum(verdicts[a] for a in answers) / len(answers)
        return {"correct": ok, "tokens": mean_steps, "thinking": mean_think, "rows_used": 1.0}
    if strategy == "majority":
        return {"correct": expected_majority(answers, gold, n, 2 * SUBSETS, rng), "tokens": n * mean_steps,
                "thinking": n * mean_think, "rows_used": float(n)}  # fmt: skip
    if strategy == "first-finish":
        # Exact over all n-subsets: the k-th shortest row wins when the other n-1 come from the
        # rows after it, with probability C(N-1-k, n-1) / C(N, n).  Every row runs until it wins.
        order = sorted(range(len(pool)), key=lambda i: (pool[i].steps[b], i))
        total = math.comb(len(pool), n)
        ok = tok = think = 0.0
        for k, i in enumerate(order):
            w = math.comb(len(pool) - 1 - k, n - 1) / total
            ok += w * verdicts[answers[i]]
            tok += w * n * pool[i].steps[b]
            think += w * n * pool[i].thinking[b]
        return {"correct": ok, "tokens": tok, "thinking": think, "rows_used": float(n)}
    ok = tok = think = used = 0.0
    for _ in range(SUBSETS):
        idx = rng.sample(range(len(pool)), n)
        ans, k = replay(strategy, [answers[i] for i in idx])
        ok += verdicts.get(ans, False)
        tok += sum(pool[i].steps[b] for i in idx[:k])
        think += sum(pool[i].thinking[b] for i in idx[:k])
        used += k
    return {"correct": ok / SUBSETS, "tokens": tok / SUBSETS, "thinking": think / SUBSETS, "rows_used": used / SUBSETS}


def direct_rows(strategy: str, n: int, b: int, pool: list[PoolRow]) -> list[list[tuple[int, bool]]]:
    """Rounds of (steps, forced) for the rows a direct run would decode (seeds 0..n-1, in order)."""
    rows = [(p.steps[b], p.forced[b]) for p in pool]
    if strategy == "single":
        return [rows[:1]]
    if strategy == "majority":
        return [rows[:n]]
    if strategy == "first-finish":
        first = min(s for s, _ in rows[:n])
        return [[(first, f) for _, f in rows[:n]]]
    _, k = replay(strategy, [p.answers[b] for p in pool[:n]])
    out, start = [], 0
    for size in ROUNDS[strategy][0](n):
        if start >= k:
            break
        out.append(rows[start : start + size])
        start += size
    return out
