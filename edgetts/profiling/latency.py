"""A step-time model of the engine, for latencies of cells that pooled mode did not run.

One decode step with ``L`` live rows at context length ``ctx`` takes
``a + b L + c L ctx`` seconds: a fixed cost per step (graph launch, sampling overhead), a cost
per row (weights are reused across rows, so on memory-bound devices ``b`` is small), and
attention, which grows with every row's context.  Forcing text costs ``token_s`` per forced
token (a small prefill).  :func:`calibrate` fits ``a, b, c`` by least squares on fixed-length
runs of 1..``max_rows`` rows through the same controller path strategies use, and measures
``token_s`` from the prefill; then a few whole strategy calls fit what a call adds around
the decode loop (``round_s`` + ``row_s`` per row); both fits keep every coefficient >= 0 and
report their mean relative residuals (``step_mape``, ``call_mape``).  A fixed reference call
(``reference_s``: max rows, fixed length) is timed with the model; repeating it after a sweep
(:func:`reference_time`) tells whether the device's speed drifted while the profile ran.
:meth:`StepModel.latency` replays the rows of a cell: each round pays its time to first token
and that overhead, then one step per token of its longest row, with the live-row count falling
as rows finish.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from edgetts.engines.base import SamplingParams
from edgetts.strategies.base import BudgetController, RunConfig


class Ticks:
    """Counts a phase's steps for ``tick(done, total)`` (nothing without one); ``tick(0, total)`` at once."""

    def __init__(self, total: int, tick=None):
        self.total, self.tick, self.done = total, tick, 0
        if tick:
            tick(0, total)

    def __call__(self) -> None:
        self.done += 1
        if self.tick:
            self.tick(self.done, self.total)


@dataclass
class StepModel:
    a: float
    b: float
    c: float
    token_s: float
    round_s: float = 0.0  # per round of rows outside the decode loop (samplers, extraction, traces)
    row_s: float = 0.0  # the same, per row
    # How well the fits explain what they were fitted on (mean relative residual), so a profile can
    # say how far its modelled latencies may be trusted before any direct check.
    step_mape: float = 0.0
    call_mape: float = 0.0
    reference_s: float = 0.0  # median time of a fixed call (max rows, fixed length), for drift checks
    reference_rows: int = 1
    reference_tokens: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> StepModel:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def step(self, rows: int, ctx: int) -> float:
        return self.a + self.b * rows + self.c * rows * ctx

    def latency(self, ttft: float, prompt_tokens: int, rounds: list[list[tuple[int, bool]]], forced_len: int) -> float:
        total = 0.0
        for rows in rounds:
            total += ttft + self.round_s + self.row_s * len(rows)
            longest = max(s for s, _ in rows)
            for s in range(1, longest):
                live = sum(1 for steps, _ in rows if steps > s)
                total += self.step(live, prompt_tokens + s)
            total += sum(f for _, f in rows) * forced_len * self.token_s
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(engine, family, question: str, max_rows: int, tokens: int = 128, tick=None) -> StepModel:
    """Fit the step-time model on ``engine``; ``tick(done, total)`` hears of each of its timed calls."""
    from edgetts.models.families import build_prompt
    from edgetts.strategies import create

    prompt = build_prompt(family, question, engine.chat_template())
    xs, ys, prefill = [], [], []
    n_prompt = engine.count_tokens(prompt) + 1
    levels = sorted({1, max(1, max_rows // 4), max(1, max_rows // 2), max_rows})
    step = Ticks(2 * len(levels) + 6 + 3, tick)  # decode calls, whole strategy calls, reference calls
    for rows in levels + levels:  # twice: the first pass also warms caches up
        cfg = RunConfig(n=rows, budget=10**6)
        t0 = time.perf_counter()
        ctl = BudgetController(engine, family, cfg, t0, None, prompt_tokens=n_prompt)
        res = engine.sample(prompt, rows, SamplingParams(max_tokens=tokens, ignore_eos=True), controller=ctl)
        times = res.rows[0].times
        for s in range(1, len(times)):
            xs.append([1.0, rows, rows * (n_prompt + s)])
            ys.append(times[s] - times[s - 1])
        prefill.append(res.ttft / n_prompt)
        step()
    a, b, c = nonnegative_lstsq(xs, ys)
    model = StepModel(a, b, c, float(np.median(prefill)))
    # Single steps jitter by more than their own length on a busy CPU: residuals relative to the mean step.
    model.step_mape = _mape(np.asarray(xs) @ np.array([a, b, c]), ys, scale=np.full(len(ys), np.mean(ys)))
    # What a whole strategy call adds around the decode loop, fitted on real calls.
    forced_len = engine.count_tokens(family.think_end + family.answer_prefix)
    fx, fy, walls = [], [], []
    for rows in [1, max_rows] * 3:
        trace = create("majority", engine, family, RunConfig(n=rows, budget=tokens)).run(question)
        rounds = [[(r.thinking_tokens + r.answer_tokens, r.forced_answer) for r in trace.rows]]
        fx.append([1.0, rows])
        fy.append(trace.wall_s - model.latency(trace.ttft_s, trace.prompt_tokens, rounds, forced_len))
        walls.append(trace.wall_s)
        step()
    model.round_s, model.row_s = nonnegative_lstsq(fx, fy)
    # The whole calls' residuals, relative to the calls' wall time (what a modelled latency is).
    model.call_mape = _mape(np.asarray(fx) @ np.array([model.round_s, model.row_s]), fy, scale=walls)
    model.reference_rows, model.reference_tokens = max_rows, tokens
    model.reference_s = reference_time(engine, prompt, max_rows, tokens, step=step)
    return model


def reference_time(engine, prompt: str, rows: int, tokens: int, calls: int = 3, step=None) -> float:
    """Median seconds of a fixed call (``rows`` rows of exactly ``tokens`` tokens): the same call before and
    after a sweep tells whether the device slowed down or sped up in between (load, clocks)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        engine.sample(prompt, rows, SamplingParams(max_tokens=tokens, ignore_eos=True))
        times.append(time.perf_counter() - t0)
        if step:
            step()
    return float(np.median(times))


def _mape(predicted, actual, scale=None) -> float:
    """Mean |predicted - actual| relative to ``scale`` (default: the actual values)."""
    p, a = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    s = np.abs(np.asarray(scale if scale is not None else actual, dtype=float))
    return float(np.mean(np.abs(p - a) / np.maximum(s, 1e-9)))


def nonnegative_lstsq(xs, ys) -> list[float]:
    """Least squares with every coefficient >= 0 (a few columns: drop the most negative one and refit).

    Each coefficient is a cost in seconds; a noisy fit on a busy machine can make one negative,
    and a negative cost would rank some cells faster than free.
    """
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while keep:
        fit, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (fit >= 0).all():
            coef[keep] = fit
            break
        keep.pop(int(np.argmin(fit)))
    return [float(v) for v in coef]
