"""Run a sweep into a profile directory, resumably.

Layout of the directory::

    device.json     the device fingerprint (edgetts.telemetry.device)
    sweep.json      the resolved sweep configuration and its digest
    records.jsonl   one record per measured query (edgetts.profiling.records)
    summary.json    one entry per cell (edgetts.profiling.summary)

Every query has a stable key ``model|strategy|n<N>|b<budget>|r<repeat>|<problem id>``, where
``model`` is the engine spec's label (the artifact for llama.cpp, else engine, artifact and
URL); every record also carries the whole spec (``engine``), so a Pareto point can reopen it.  A
rerun loads the records, skips every key already there and measures the rest, so a profile
killed at any point (SIGKILL included) continues without losing or repeating a record.
Seeds depend only on the key (rows of repeat ``r`` use ``seed + 1000 r + i``), so the
resumed records equal those of an uninterrupted run, timings aside.  A directory made by a
different sweep is refused unless ``force``; then its files move to ``replaced-<digest>/``
rather than being deleted.

Direct mode runs every cell as production would: the strategy with its budget on the real
engine, one query at a time, each wrapped in a :class:`~edgetts.telemetry.meters.QueryMeter`.
Pooled mode (:mod:`edgetts.profiling.pooled`) covers the strategies that declare themselves
``pooled`` on engines with probes; every other cell runs directly.  A strategy that needs a
capability one of the sweep's engines lacks is refused before anything is measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgetts.fileio import write_json_atomic
from edgetts.profiling.config import SweepConfig
from edgetts.profiling.records import RecordLog
from edgetts.profiling.summary import summarize


class ProfileError(ValueError):
    """A profile directory that cannot be used for this sweep."""


def prepare_dir(out: Path, cfg: SweepConfig, force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sweep = out / "sweep.json"
    if sweep.exists():
        try:
            old = json.loads(sweep.read_text())
        except json.JSONDecodeError:
            old = {"digest": "unreadable"}
        if old.get("digest") != cfg.digest():
            if not force:
                raise ProfileError(
                    f"{out} holds a profile of a different sweep (digest {old.get('digest')}, this one "
                    f"{cfg.digest()}); use another --out, or --force to move its files aside"
                )
            keep = out / f"replaced-{old.get('digest')}"
            keep.mkdir(exist_ok=True)
            for name in ("sweep.json", "records.jsonl", "summary.json", "device.json"):
                if (out / name).exists():
                    (out / name).rename(keep / name)
    write_json_atomic(sweep, {"digest": cfg.digest(), "sweep": cfg.resolved()})


def record_key(model: str, strategy: str, n: int, budget: int, repeat: int, problem: str) -> str:
    return f"{model}|{strategy}|n{n}|b{budget}|r{repeat}|{problem}"


def run_profile(
    cfg: SweepConfig,
    out: str | Path,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Measure every missing query of ``cfg`` into ``out``; returns the summary."""
    from edgetts.engines import engine_class, open_engine
    from edgetts.strategies import STRATEGIES, RunConfig, create
    from edgetts.tasks.datasets import load_dataset
    from edgetts.telemetry.device import fingerprint
    from edgetts.telemetry.meters import QueryMeter

    out = Path(out)
    examples = load_dataset(cfg.dataset, limit=cfg.limit, seed=cfg.seed)
    specs = [s.resolved() for s in cfg.specs()]  # fail on a bad model before touching the directory
    cells = cfg.cells()
    for spec in specs:
        cls = engine_class(spec.engine)
        for name in {c[0] for c in cells}:
            missing = [cap for cap in STRATEGIES[name].requires if not getattr(cls, cap, False)]
            if missing:
                raise ProfileError(f"strategy {name!r} needs an engine with {', '.join(missing)}; "
                                   f"{spec.engine!r} ({spec.label}) lacks it")  # fmt: skip
    prepare_dir(out, cfg, force)
    if not (out / "device.json").exists():
        write_json_atomic(out / "device.json", fingerprint())
    log = RecordLog(out / "records.jsonl")
    done = log.load()
    total = len(specs) * len(cells) * cfg.repeats * len(examples)
    count = len(done)
    if progress:
        progress(count, total, "resuming" if count else "starting")
    ctx = Context(cfg, log, done, QueryMeter(), progress, total)
    ctx.count = count
    for spec in specs:
        model = spec.label
        can_pool = cfg.mode == "pooled" and engine_class(spec.engine).probes
        pooled = [c for c in cells if can_pool and STRATEGIES[c[0]].pooled]
        direct = [c for c in cells if c not in pooled]
        todo = [
            (s, n, b, r, ex) for s, n, b in direct for r in range(cfg.repeats) for ex in examples
            if record_key(model, s, n, b, r, ex.id) not in done
        ]  # fmt: skip
        todo_pool = [
            (r, ex) for r in range(cfg.repeats) for ex in examples
            if any(record_key(model, s, n, b, r, ex.id) not in done for s, n, b in pooled)
        ]  # fmt: skip
        if not todo and not todo_pool:
            continue
        answer = RunConfig().answer_tokens
        engine, family = open_engine(spec, max_rows=max(n for _, n, _ in cells), max_tokens=max(cfg.budgets) + answer,
                                     probe_tokens=answer if pooled else 0)  # fmt: skip
        ctx.spec = spec.to_dict()
        try:
            for ex in examples[: cfg.warmup]:  # untimed: caches, allocations, clocks ramping up
                s, n, b = cells[0]
                create(s, engine, family, RunConfig(n=n, budget=b)).run(ex.question)
            if todo_pool:
                run_pooled(ctx, model, engine, family, pooled, todo_pool, out)
            for s, n, b, r, ex in todo:
                run_direct(ctx, model, engine, family, (s, n, b), r, ex)
        finally:
            engine.close()
    return write_summary(out)


class Context:
    """What the measuring loops share: the sweep, the log, the meter and progress reporting."""

    def __init__(self, cfg, log, done, meter, progress, total):
        self.cfg, self.log, self.done, self.meter, self.progress, self.total = cfg, log, done, meter, progress, total
        self.count = 0
        self.spec: dict = {}  # the engine spec of the model being measured, carried by every record

    def write(self, record: dict, what: str) -> None:
        record["engine"] = self.spec
        self.log.append(record)
        self.count += 1
        if self.progress:
            self.progress(self.count, self.total, what)


def _energy(m, seconds: float) -> dict:
    """Energy fields of a record; pooled cells scale the pool's average power to their own latency."""
    joules = m.avg_power_w * seconds if m.avg_power_w is not None else None
    return {
        "energy_j": joules,
        "avg_power_w": m.avg_power_w,
        "energy_source": m.energy_source,
        "energy_reason": m.energy_reason,
        "peak_rss_mb": round(m.peak_rss_mb, 2),
        "peak_gpu_mb": m.peak_gpu_mb,
    }


def run_direct(ctx: Context, model, engine, family, cell, r: int, ex) -> None:
    from edgetts.engines.base import SamplingParams
    from edgetts.strategies import RunConfig, create
    from edgetts.tasks.grading import is_equivalent

    s, n, b = cell
    sampling = SamplingParams(temperature=ctx.cfg.temperature, seed=ctx.cfg.seed + 1000 * r)
    strat = create(s, engine, family, RunConfig(n=n, budget=b, sampling=sampling))
    with ctx.meter.measure() as measured:
        trace = strat.run(ex.question)
    m = measured()
    steps = max((rt.thinking_tokens + rt.answer_tokens for rt in trace.rows), default=1)
    rec = {
        "key": record_key(model, s, n, b, r, ex.id), "model": model, "strategy": s, "n": n, "budget": b,
        "repeat": r, "problem": ex.id, "level": ex.level, "mode": "direct",
        "answer": trace.answer, "gold": ex.answer, "correct": float(is_equivalent(trace.answer, ex.answer)),
        "latency_s": trace.wall_s, "ttft_s": trace.ttft_s or trace.wall_s,
        "tpot_s": (trace.wall_s - (trace.ttft_s or 0)) / max(1, steps - 1),
        "prompt_tokens": trace.prompt_tokens, "generated_tokens": trace.generated_tokens,
        "thinking_tokens": sum(rt.thinking_tokens for rt in trace.rows),
        "answer_tokens": sum(rt.answer_tokens for rt in trace.rows),
        "rows_used": trace.rows_used, "early_stop": trace.early_stop,
        **_energy(m, trace.wall_s),
    }  # fmt: skip
    rec["energy_j"] = m.energy_j  # measured, not scaled
    ctx.write(rec, f"{model} {s} n={n} b={b}")


def run_pooled(ctx: Context, model, engine, family, cells, todo, out: Path) -> None:
    import random

    from edgetts.engines.base import SamplingParams
    from edgetts.models.families import build_prompt
    from edgetts.profiling.latency import calibrate
    from edgetts.profiling.pooled import cell_estimate, direct_rows, sample_pool

    n_max = max(n for _, n, _ in cells)
    budgets = sorted({b for *_, b in cells})
    steps = calibrate(engine, family, todo[0][1].question, n_max, tokens=min(max(budgets) + 32, 256))
    write_json_atomic(out / f"latency-model-{_safe(model)}.json", steps.to_dict())
    forced_len = engine.count_tokens(family.think_end + family.answer_prefix)
    for r, ex in todo:
        sampling = SamplingParams(temperature=ctx.cfg.temperature, seed=ctx.cfg.seed + 1000 * r)
        prompt = build_prompt(family, ex.question, engine.chat_template())
        with ctx.meter.measure() as measured:
            pool, ttft, prompt_tokens = sample_pool(engine, family, prompt, n_max, budgets, sampling)
        m = measured()
        for s, n, b in cells:
            key = record_key(model, s, n, b, r, ex.id)
            if key in ctx.done:
                continue
            est = cell_estimate(s, n, b, pool, ex.answer, random.Random(f"{ctx.cfg.seed}|{key}"))
            rounds = direct_rows(s, n, b, pool)
            latency = steps.latency(ttft, prompt_tokens, rounds, forced_len)
            longest = max(st for rows in rounds for st, _ in rows)
            rec = {
                "key": key, "model": model, "strategy": s, "n": n, "budget": b, "repeat": r, "problem": ex.id,
                "level": ex.level, "mode": "pooled", "answer": None, "gold": ex.answer, "correct": est["correct"],
                "latency_s": latency, "ttft_s": ttft, "tpot_s": (latency - ttft * len(rounds)) / max(1, longest - 1),
                "prompt_tokens": prompt_tokens, "generated_tokens": est["tokens"], "thinking_tokens": est["thinking"],
                "answer_tokens": est["tokens"] - est["thinking"], "rows_used": est["rows_used"], "early_stop": None,
                **_energy(m, latency),
            }  # fmt: skip
            ctx.write(rec, f"{model} pooled {s} n={n} b={b}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)


def write_summary(out: str | Path) -> dict:
    """Summarize whatever records the directory holds (also after an interruption)."""
    out = Path(out)
    summary = summarize(RecordLog(out / "records.jsonl").load())
    write_json_atomic(out / "summary.json", summary)
    return summary
