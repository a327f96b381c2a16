"""Accuracy of a model on a benchmark: one sample, majority of N, and a forced cut of reasoning.

For every problem the engine draws a pool of ``pool`` rows in one batch (row ``i`` seeded
``seed + i``) with the full token budget.  Single-sample accuracy is the mean correctness over
the pool.  Majority-of-``n`` accuracy is the expected accuracy of a vote over ``n`` rows,
estimated by voting over ``subsets`` random ``n``-subsets of the pool (seeded), as
search-and-learn computes maj@n: one draw of ``n`` rows per problem would add several points
of sampling noise to a 100-problem level.  Votes drop rows without an answer; ties go to the
answer seen first.

The cut probe measures what thinking buys: on the hardest level, every row's reasoning is
stopped at half the median thinking length of the full rows, the end-of-thinking delimiter
and the answer prefix are forced, and the answer the model then writes is graded.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from edgetts.engines.base import Engine, SamplingParams
from edgetts.models.families import Family, build_prompt
from edgetts.strategies.aggregate import majority_vote
from edgetts.strategies.base import BudgetController, RunConfig
from edgetts.tasks.datasets import Example
from edgetts.tasks.grading import extract_answer, is_equivalent

ANSWER_TOKENS = 12  # room for the answer after a forced end of thinking


@dataclass
class LevelResult:
    level: int | str | None
    problems: int = 0
    single: float = 0.0
    majority: float = 0.0  # expected accuracy of a majority vote over n rows
    mean_tokens: float = 0.0
    median_thinking_tokens: float | None = None
    cut_budget: int | None = None
    cut_single: float | None = None


@dataclass
class EvalResult:
    model: str
    dataset: str
    n: int
    pool: int
    temperature: float
    seed: int
    levels: list[LevelResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _thinking_tokens(engine: Engine, family: Family, text: str) -> int | None:
    if not family.think_end or family.think_end not in text:
        return None
    return engine.count_tokens(text.split(family.think_end, 1)[0])


def expected_majority(answers: list[str | None], gold: str, n: int, subsets: int, rng: random.Random) -> float:
    """Mean correctness of majority votes over ``subsets`` random ``n``-subsets of ``answers``."""
    if n >= len(answers):
        return float(is_equivalent(majority_vote(answers).answer, gold))
    verdict: dict[str | None, bool] = {}
    hits = 0
    for _ in range(subsets):
        m = majority_vote(rng.sample(answers, n)).answer
        if m not in verdict:
            verdict[m] = is_equivalent(m, gold)
        hits += verdict[m]
    return hits / subsets


def evaluate(
    engine: Engine,
    examples: list[Example],
    family: Family,
    n: int = 8,
    pool: int = 32,
    subsets: int = 500,
    params: SamplingParams | None = None,
    cut_probe: bool = True,
    progress: Callable[[int], None] | None = None,
    model_name: str = "",
    dataset_name: str = "",
) -> EvalResult:
    if pool < n:
        raise ValueError(f"pool ({pool}) must be at least n ({n})")
    params = params or SamplingParams(max_tokens=160)
    rng = random.Random(params.seed)
    by_level: dict = {}
    for ex in examples:
        by_level.setdefault(ex.level, []).append(ex)
    order = sorted(by_level, key=lambda lv: (lv is None, str(type(lv)), lv if lv is not None else 0))
    result = EvalResult(model_name, dataset_name, n, pool, params.temperature, params.seed)
    for level in order:
        exs = by_level[level]
        lr = LevelResult(level, len(exs))
        correct_single = correct_major = tokens = 0.0
        thinking: list[int] = []
        for ex in exs:
            prompt = build_prompt(family, ex.question, engine.chat_template())
            res = engine.sample(prompt, pool, params)
            answers = [extract_answer(t, family.think_start, family.think_end) for t in res.texts]
            correct_single += sum(is_equivalent(a, ex.answer) for a in answers)
            correct_major += expected_majority(answers, ex.answer, n, subsets, rng)
            tokens += sum(r.n_generated for r in res.rows)
            thinking += [k for k in (_thinking_tokens(engine, family, t) for t in res.texts) if k is not None]
            if progress:
                progress(1)
        lr.single = correct_single / (pool * len(exs))
        lr.majority = correct_major / len(exs)
        lr.mean_tokens = tokens / (pool * len(exs))
        lr.median_thinking_tokens = statistics.median(thinking) if thinking else None
        if cut_probe and level == order[-1] and thinking:
            lr.cut_budget = max(1, int(lr.median_thinking_tokens // 2))
            lr.cut_single = cut_accuracy(engine, exs, family, lr.cut_budget, pool, params, progress)
        result.levels.append(lr)
    return result


def cut_accuracy(engine: Engine, exs, family: Family, budget: int, n: int, params, progress=None) -> float:
    """Single-sample accuracy when reasoning is cut at ``budget`` tokens and the answer forced.

    The strategies' budget controller does the cut: at ``budget`` thinking tokens it forces the
    end of thinking and the answer prefix and allows ``ANSWER_TOKENS`` sampled answer tokens.
    """
    cfg = RunConfig(n=n, budget=budget, answer_tokens=ANSWER_TOKENS, sampling=params)
    params = replace(params, max_tokens=budget + ANSWER_TOKENS)
    correct = 0
    for ex in exs:
        prompt = build_prompt(family, ex.question, engine.chat_template())
        cut = BudgetController(engine, family, cfg, time.perf_counter(), None)
        res = engine.sample(prompt, n, params, controller=cut)
        correct += sum(is_equivalent(extract_answer(t, family.think_start, family.think_end), ex.answer)
                       for t in res.texts)  # fmt: skip
        if progress:
            progress(1)
    return correct / (n * len(exs))
