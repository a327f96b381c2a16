"""Strategies that sample several rows and aggregate them.

* ``majority`` (self-consistency): ``n`` rows in one batch, majority vote.
* ``weighted`` (DeepConf-style): rows carry token log-probabilities; each row's confidence is
  its mean log-probability (``confidence="mean"``) or its lowest sliding-window mean
  (``"lowest-window"``, window ``window``); votes are weighted by ``exp(confidence)``, after
  keeping only the ``keep`` most confident fraction.  ``online=True`` first runs ``warmup``
  rows, sets a threshold at their ``1 - keep`` confidence quantile, then runs the remaining
  rows and stops any row whose current window mean falls below it (its vote is dropped).
* ``best-of-n``: a verifier scores each row; the best-scoring answer wins, or with
  ``weighted=True`` the answer with the largest summed ``exp(score)``.  The shipped verifier
  needs no extra model: the model's own mean log-probability of its answer tokens.
* ``adaptive`` (Adaptive-Consistency, Aggarwal et al. 2023): rows are drawn in rounds (first
  ``start``, then ``step`` more) until the Beta posterior that the leading answer beats the
  runner-up exceeds ``threshold``, or ``n`` rows were used.
* ``esc`` (Early-Stopping Self-Consistency, Li et al. 2024): rows are drawn in windows of
  ``window`` (default a quarter of ``n``, at least 2); sampling stops after a window whose
  answers are all the same.

Rows are seeded ``seed + i`` by their overall index, so the first rows of ``adaptive`` and
``esc`` are exactly the rows ``majority`` would draw: their comparisons are paired.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from edgetts.engines.base import Control, Row
from edgetts.strategies import aggregate as agg
from edgetts.strategies import pooling
from edgetts.strategies.base import BudgetController, RowTrace, Strategy, StrategyError, Trace


class Majority(Strategy):
    name = "majority"
    pooled = True

    @classmethod
    def pool_estimate(cls, n, samples, verdicts, rng):
        return pooling.expected_vote(n, samples, verdicts, rng)

    def run(self, question: str) -> Trace:
        t0 = time.perf_counter()
        res, ctl = self.sample(self.prompt(question), self.cfg.n, t0, self.seeds(0, self.cfg.n))
        rows = [self.row_trace(r, ctl) for r in res.rows]
        vote = agg.majority_vote([r.answer for r in rows])
        return self.trace(rows, vote.answer, vote.tally, t0, res.ttft)


def _sampled_logprobs(row: Row, start: int = 0) -> list[float]:
    """Log-probabilities of the sampled tokens from token index ``start`` on."""
    k = sum(1 for f in row.forced[:start] if not f)
    return row.logprobs[k:]


class _ConfidenceController(BudgetController):
    threshold: float = -math.inf
    window: int = 16

    def on_step(self, ctl: Control, stepped: list[int]) -> None:
        if self.threshold == -math.inf:
            return
        for i in stepped:
            r = ctl.rows[i]
            if r.finished or i in self.answer_start or len(r.logprobs) < self.window:
                continue
            if sum(r.logprobs[-self.window :]) / self.window < self.threshold:
                ctl.stop(i, "low-confidence")


class Weighted(Strategy):
    name = "weighted"
    requires = ("steppable", "forced_tokens", "logprobs")
    controller_class = _ConfidenceController

    def configure(self, confidence: str = "lowest-window", window: int = 16, keep: float = 1.0,
                  online: bool = False, warmup: int | None = None) -> None:  # fmt: skip
        if confidence not in ("mean", "lowest-window"):
            raise StrategyError("confidence must be 'mean' or 'lowest-window'")
        if not 0 < keep <= 1 or window < 1:
            raise StrategyError("keep must be in (0, 1] and window >= 1")
        self.confidence, self.window, self.keep, self.online = confidence, window, keep, online
        self.warmup = warmup if warmup is not None else max(1, self.cfg.n // 2)
        if online and not 1 <= self.warmup < self.cfg.n:
            raise StrategyError(f"online mode needs 1 <= warmup < n, got warmup={self.warmup}, n={self.cfg.n}")

    def score(self, row: Row) -> float:
        lps = _sampled_logprobs(row)
        if self.confidence == "mean":
            return agg.mean_confidence(lps)
        return agg.lowest_window_confidence(lps, self.window)

    def run(self, question: str) -> Trace:
        t0 = time.perf_counter()
        prompt, n = self.prompt(question), self.cfg.n
        first = self.warmup if self.online else n
        res, ctl = self.sample(prompt, first, t0, self.seeds(0, first), logprobs=0)
        rows = [self._trace(r, ctl) for r in res.rows]
        ttft, early = res.ttft, None
        if self.online:
            confs = sorted(r.confidence for r in rows)
            cut = confs[min(len(confs) - 1, int((1 - self.keep) * len(confs)))]
            online_ctl = _ConfidenceController(self.engine, self.family, self.cfg, t0, None)
            online_ctl.threshold, online_ctl.window = cut, self.window
            res2, ctl2 = self.sample(prompt, n - first, t0, self.seeds(first, n - first), logprobs=0,
                                     controller=online_ctl)  # fmt: skip
            more = [self._trace(r, ctl2) for r in res2.rows]
            early = "low-confidence" if any(r.finish_reason == "low-confidence" for r in more) else None
            for r in more:
                if r.finish_reason == "low-confidence":
                    r.answer = None  # a stopped trace has no vote
            rows += more
        kept = sorted((r for r in rows if r.answer is not None), key=lambda r: -r.confidence)
        kept = kept[: max(1, math.ceil(self.keep * len(kept)))] if not self.online else kept
        vote = agg.weighted_vote([r.answer for r in kept], [math.exp(r.confidence) for r in kept])
        return self.trace(rows, vote.answer, vote.tally, t0, ttft, early_stop=early)

    def _trace(self, row: Row, ctl: BudgetController) -> RowTrace:
        t = self.row_trace(row, ctl)
        t.confidence = self.score(row)
        return t


class Verifier(Protocol):
    """Scores a finished row; higher is better."""

    def score(self, question: str, row: Row, answer: str | None, answer_start: int) -> float: ...


class SelfLikelihood:
    """The model's own mean log-probability of the tokens it wrote after its reasoning."""

    def score(self, question: str, row: Row, answer: str | None, answer_start: int) -> float:
        if answer is None:
            return -math.inf
        return agg.mean_confidence(_sampled_logprobs(row, answer_start))


class BestOfN(Strategy):
    name = "best-of-n"
    requires = ("steppable", "forced_tokens", "logprobs")

    def configure(self, verifier: Verifier | None = None, weighted: bool = False) -> None:
        self.verifier, self.weighted = verifier or SelfLikelihood(), weighted

    def run(self, question: str) -> Trace:
        t0 = time.perf_counter()
        res, ctl = self.sample(self.prompt(question), self.cfg.n, t0, self.seeds(0, self.cfg.n), logprobs=0)
        rows = []
        for r in res.rows:
            t = self.row_trace(r, ctl)
            t.score = self.verifier.score(question, r, t.answer, ctl.answer_start.get(r.index, len(r.tokens)))
            rows.append(t)
        scored = [r for r in rows if r.answer is not None]
        if self.weighted:
            vote = agg.weighted_vote([r.answer for r in scored], [math.exp(r.score) for r in scored])
            answer, votes = vote.answer, vote.tally
        else:
            best = max(scored, key=lambda r: r.score, default=None)  # ties: the lower row index
            answer = best.answer if best else None
            votes = {r.answer: r.score for r in sorted(scored, key=lambda r: -r.score)}
        return self.trace(rows, answer, votes, t0, res.ttft)


class _Rounds(Strategy):
    """Draw rows in rounds until a stopping rule holds on all answers so far (or n rows).

    ``round_sizes(n)`` and ``stop_rule(answers, last_round)`` (class methods, default options) are
    shared by :meth:`run` and by pooled profiling's replay of the rule.
    """

    pooled = True

    @staticmethod
    def round_sizes(n: int) -> list[int]:
        raise NotImplementedError

    @staticmethod
    def stop_rule(answers: list[str | None], last_round: list[str | None]) -> bool:
        raise NotImplementedError

    def sizes(self) -> list[int]:
        return self.round_sizes(self.cfg.n)

    def should_stop(self, answers: list[str | None], last_round: list[str | None]) -> bool:
        return self.stop_rule(answers, last_round)

    @classmethod
    def pool_estimate(cls, n, samples, verdicts, rng):
        return pooling.replay_rounds(n, samples, verdicts, rng, cls.round_sizes, cls.stop_rule)

    @classmethod
    def pool_rounds(cls, n, samples):
        return pooling.rounds_used(n, samples, cls.round_sizes, cls.stop_rule)

    def run(self, question: str) -> Trace:
        t0 = time.perf_counter()
        prompt, rows, ttft, early = self.prompt(question), [], None, None
        for size in self.sizes():
            if self.cfg.deadline_ms is not None and rows:
                spent = (time.perf_counter() - t0) * 1000
                if spent + 1.5 * spent / len(rows) * size > self.cfg.deadline_ms:  # a round costs about the last
                    early = "deadline"
                    break
            res, ctl = self.sample(prompt, size, t0, self.seeds(len(rows), size))
            ttft = res.ttft if ttft is None else ttft
            new = [self.row_trace(r, ctl) for r in res.rows]
            rows += new
            if any(r.finish_reason == "deadline" for r in res.rows):
                early = "deadline"
                break
            if len(rows) < self.cfg.n and self.should_stop([r.answer for r in rows], [r.answer for r in new]):
                early = self.name
                break
        vote = agg.majority_vote([r.answer for r in rows])
        return self.trace(rows, vote.answer, vote.tally, t0, ttft, early_stop=early)


class Adaptive(_Rounds):
    name = "adaptive"

    def configure(self, threshold: float = 0.95, start: int = 4, step: int = 2) -> None:
        if not 0.5 <= threshold < 1 or start < 1 or step < 1:
            raise StrategyError("threshold must be in [0.5, 1), start and step >= 1")
        self.threshold, self.start, self.step = threshold, start, step

    round_sizes = staticmethod(agg.adaptive_rounds)

    @staticmethod
    def stop_rule(answers, last_round) -> bool:
        return agg.adaptive_should_stop(answers)

    def sizes(self) -> list[int]:
        return agg.adaptive_rounds(self.cfg.n, self.start, self.step)

    def should_stop(self, answers, last_round) -> bool:
        return agg.adaptive_should_stop(answers, self.threshold)


class ESC(_Rounds):
    name = "esc"

    def configure(self, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise StrategyError("window must be >= 1")
        self.window = window  # None: ESC's small default window (agg.esc_rounds)

    round_sizes = staticmethod(agg.esc_rounds)

    @staticmethod
    def stop_rule(answers, last_round) -> bool:
        return agg.esc_should_stop(last_round, len(last_round))

    def sizes(self) -> list[int]:
        return agg.esc_rounds(self.cfg.n, self.window)
