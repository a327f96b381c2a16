"""One-row strategies: a capped single sample, s1 budget forcing, a prompt length hint, First Finish Search.

* ``single``: one row; at the thinking budget the end-of-thinking delimiter and the answer
  prefix are forced and a few answer tokens allowed.
* ``budget-forcing`` (s1, Muennighoff et al. 2025): the same cap, and when the model ends its
  reasoning early, the end-of-thinking token is replaced by "Wait" (``wait_text``), at most
  ``max_waits`` times and, if ``min_thinking`` is set, only while fewer thinking tokens than
  that have been written.
* ``length-hint``: the prompt asks to keep the reasoning under the budget; with
  ``hard_cap=True`` (default) the budget is also enforced, without it the row may think up to
  ``soft_factor`` times the budget, so the hint's own effect can be measured.
* ``first-finish`` (First Finish Search, Agarwal et al. 2025): ``n`` rows in one batch; the
  first row to finish on its own wins and every other row stops at once.
"""

from __future__ import annotations

import time

from edgetts.engines.base import Control, Row
from edgetts.strategies import pooling
from edgetts.strategies.base import BudgetController, Strategy, StrategyError, Trace


class Single(Strategy):
    name = "single"
    single_row = True
    pooled = True

    @classmethod
    def pool_estimate(cls, n, samples, verdicts, rng):
        return pooling.mean_of_rows(samples, verdicts)

    def run(self, question: str) -> Trace:
        t0 = time.perf_counter()
        res, ctl = self.sample(self.prompt(question), 1, t0, self.seeds(0, 1))
        row = self.row_trace(res.rows[0], ctl)
        votes = {row.answer: 1.0} if row.answer is not None else {}
        return self.trace([row], row.answer, votes, t0, res.ttft)


class _WaitController(BudgetController):
    wait_text = "Wait"
    max_waits = 1
    min_thinking: int | None = None

    def on_think_end(self, ctl: Control, row: Row) -> bool:
        used = self.waits.get(row.index, 0)
        short = self.min_thinking is None or self.thinking_tokens(row) < self.min_thinking
        if used < self.max_waits and short and self.thinking_tokens(row) < self.cfg.budget:
            ctl.replace_last(row.index, self.wait_text)
            self.waits[row.index] = used + 1
            return True
        return False


class BudgetForcing(Single):
    name = "budget-forcing"
    pooled = False  # "Wait" changes what is sampled
    requires = ("steppable", "forced_tokens")  # "Wait" replaces the end-of-thinking token as it is sampled

    def configure(self, max_waits: int = 1, min_thinking: int | None = None, wait_text: str = "Wait") -> None:
        if max_waits < 0 or (min_thinking is not None and min_thinking < 0):
            raise StrategyError("max_waits and min_thinking must be >= 0")
        self.controller_class = type(
            "WaitController", (_WaitController,),
            {"max_waits": max_waits, "min_thinking": min_thinking, "wait_text": wait_text},
        )  # fmt: skip


class LengthHint(Single):
    name = "length-hint"
    pooled = False  # the hint changes the prompt
    hint = "\nLimit your reasoning to {budget} tokens."

    def configure(self, hard_cap: bool = True, soft_factor: int = 4) -> None:
        if soft_factor < 1:
            raise StrategyError("soft_factor must be >= 1")
        self.hard_cap, self.soft_factor = hard_cap, soft_factor

    def prompt(self, question: str) -> str:
        return super().prompt(question + self.hint.format(budget=self.cfg.budget))

    def run(self, question: str) -> Trace:
        if self.hard_cap:
            return super().run(question)
        from dataclasses import replace

        capped, self.cfg = self.cfg, replace(self.cfg, budget=self.cfg.budget * self.soft_factor)
        try:
            return super().run(question)
        finally:
            self.cfg = capped


class _FirstFinishController(BudgetController):
    winner: int | None = None

    def on_step(self, ctl: Control, stepped: list[int]) -> None:
        done = [i for i in stepped if ctl.rows[i].finish_reason == "stop"]
        if done and self.winner is None:  # several at once (a round of server requests): the shortest
            self.winner = min(done, key=lambda i: (ctl.rows[i].n_generated, i))
            ctl.stop_all("first-finish")


class FirstFinish(Strategy):
    name = "first-finish"
    controller_class = _FirstFinishController
    pooled = True

    @classmethod
    def pool_estimate(cls, n, samples, verdicts, rng):
        return pooling.first_finisher(n, samples, verdicts)

    @classmethod
    def pool_rounds(cls, n, samples):
        first = min(s.steps for s in samples[:n])  # every row stops when the first one finishes
        return [[pooling.PoolSample(s.answer, first, min(s.thinking, first), s.forced) for s in samples[:n]]]

    def run(self, question: str) -> Trace:
        t0 = time.perf_counter()
        n = self.cfg.n
        res, ctl = self.sample(self.prompt(question), n, t0, self.seeds(0, n))
        rows = [self.row_trace(r, ctl) for r in res.rows]
        if ctl.winner is not None:
            win, reason = ctl.winner, "first-finish"
        else:  # nobody finished on their own (budget or deadline): the shortest answered row
            answered = [r for r in res.rows if rows[r.index].answer is not None] or res.rows
            win, reason = min(answered, key=lambda r: (len(r.tokens), r.index)).index, None
        answer = rows[win].answer
        votes = {answer: 1.0} if answer is not None else {}
        return self.trace(rows, answer, votes, t0, res.ttft, early_stop=reason)
