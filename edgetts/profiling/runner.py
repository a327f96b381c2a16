"""Run a sweep into a profile directory (:mod:`edgetts.profiling.directory`), resumably.

Every query has a stable key ``model|strategy|n<N>|b<budget>|r<repeat>|<problem id>``, where
``model`` is the engine spec's label (the artifact for llama.cpp, else engine, artifact and
URL); every record also carries the whole spec (``engine``), so a Pareto point can reopen it.  A
rerun loads the records, skips every key already there and measures the rest, so a profile
killed at any point (SIGKILL included) continues without losing or repeating a record.
Seeds depend only on the key (rows of repeat ``r`` use ``seed + 1000 r + i``), so the
resumed records equal those of an uninterrupted run, timings aside.

Direct mode runs every cell as production would: the strategy with its budget on the real
engine, one query at a time, each wrapped in a :class:`~edgetts.telemetry.meters.QueryMeter`,
problem by problem with every cell on each (a speed that drifts during the sweep reaches every
cell's times alike).
Pooled mode (:mod:`edgetts.profiling.pooled`) covers the strategies that declare themselves
``pooled`` on engines with probes; every other cell runs directly.  After the pool, a few
pooled cells are run directly and the step-time model is checked for drift
(:mod:`edgetts.profiling.validation`); the result lands in ``summary.json`` as
``latency_validation``.  A resumed run reuses the saved step-time model and check.  A strategy that needs a
capability one of the sweep's engines lacks is refused before anything is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgetts.fileio import write_json_atomic
from edgetts.profiling.config import SweepConfig
from edgetts.profiling.directory import (
    ProfileError,
    _latency_file,
    _read_object,
    prepare_dir,
    profile_dir,
    record_key,
    write_models,
    write_summary,
)
from edgetts.profiling.records import RecordLog


def run_profile(
    cfg: SweepConfig,
    out: str | Path,
    force: bool = False,
    progress: Callable[..., None] | None = None,
    memory_mb: float | None = None,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Measure every missing query of ``cfg`` into ``out``, holding its lock; returns the summary.

    ``progress(done, total, what, phase)`` is told of every step of each phase: ``calibrating``
    (the step-time model of a pooled profile), ``sweep`` (queries), ``validating`` (direct runs
    checking the modelled latencies); each phase counts its own steps, so each has an ETA.
    ``memory_mb`` caps the memory an engine may plan for (default: what the device has free).
    ``shard=(i, n)`` measures the i-th of n disjoint slices of the problems (every n-th problem from
    the i-th, so each slice spans the levels), for ``edgetts merge`` to join."""
    with profile_dir(Path(out)):  # another run holding it is a one-line ProfileError
        return _measure(cfg, out, force, progress, memory_mb, shard)


def _measure(cfg: SweepConfig, out: str | Path, force: bool, progress, memory_mb: float | None,
             shard: tuple[int, int] | None = None) -> dict:  # fmt: skip
    from edgetts.engines import engine_class, open_engine
    from edgetts.strategies import STRATEGIES, RunConfig, create
    from edgetts.tasks.datasets import load_dataset
    from edgetts.telemetry.device import fingerprint, with_power_mode
    from edgetts.telemetry.meters import QueryMeter

    out = Path(out)
    examples = load_dataset(cfg.dataset, limit=cfg.limit, seed=cfg.seed)
    if shard:
        problems = len(examples)
        examples = examples[shard[0] :: shard[1]]
        if not examples:
            raise ProfileError(f"shard {shard[0]}/{shard[1]} holds no problem: the sweep has {problems} problem(s)")
    specs = [s.resolved() for s in cfg.specs()]  # fail on a bad model before changing the directory's files
    cells = cfg.cells()
    for spec in specs:
        cls = engine_class(spec.engine)
        for name in {c[0] for c in cells}:
            missing = [cap for cap in STRATEGIES[name].requires if not getattr(cls, cap, False)]
            if missing:
                raise ProfileError(f"strategy {name!r} needs an engine with {', '.join(missing)}; "
                                   f"{spec.engine!r} ({spec.label}) lacks it")  # fmt: skip
    prepare_dir(out, cfg, force, shard)
    if not (out / "device.json").exists():
        write_json_atomic(out / "device.json", fingerprint())
    write_models(out, specs)
    log = RecordLog(out / "records.jsonl")
    done = log.load()
    total = len(specs) * len(cells) * cfg.repeats * len(examples)
    count = len(done)
    if progress:
        progress(count, total, "resuming" if count else "starting", "sweep")
    ctx = Context(cfg, log, done, QueryMeter(), progress, total)
    ctx.count = count
    for spec in specs:
        model = spec.label
        can_pool = cfg.mode == "pooled" and engine_class(spec.engine).probes_for(spec)
        pooled = [c for c in cells if can_pool and STRATEGIES[c[0]].pooled]
        direct = [c for c in cells if c not in pooled]
        # Problem by problem, every cell on each: a device whose speed drifts while it profiles (heat, a
        # clock, other work) then moves every cell's times alike instead of those of the cells measured last.
        todo = [
            (s, n, b, r, ex) for r in range(cfg.repeats) for ex in examples for s, n, b in direct
            if record_key(model, s, n, b, r, ex.id) not in done
        ]  # fmt: skip
        todo_pool = [
            (r, ex) for r in range(cfg.repeats) for ex in examples
            if any(record_key(model, s, n, b, r, ex.id) not in done for s, n, b in pooled)
        ]  # fmt: skip
        # Checked also after a run killed during the check; not when every pooled record predates this
        # run and their step-time model was lost, as there is nothing to compare them with.
        check = (bool(pooled) and not _latency_file(out, "validation", model).exists()
                 and (bool(todo_pool) or latency_model(out, model) is not None))  # fmt: skip
        if not todo and not todo_pool and not check:
            continue
        answer = RunConfig().answer_tokens
        engine, family = open_engine(spec, max_rows=max(n for _, n, _ in cells), max_tokens=max(cfg.budgets) + answer,
                                     probe_tokens=answer if pooled else 0, memory_mb=memory_mb)  # fmt: skip
        ctx.spec = spec.to_dict()
        ctx.settings = with_power_mode(engine.settings())
        try:
            for ex in examples[: cfg.warmup]:  # untimed: caches, allocations, clocks ramping up
                s, n, b = cells[0]
                create(s, engine, family, RunConfig(n=n, budget=b)).run(ex.question)
            if todo_pool:
                run_pooled(ctx, model, engine, family, pooled, todo_pool, out)
            if check:
                check_latencies(ctx, model, engine, family, pooled, examples, out)
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
        self.settings: dict = {}  # the run-time settings it runs under (``profiled_with``)

    def write(self, record: dict, what: str) -> None:
        record["engine"] = self.spec
        record["profiled_with"] = self.settings
        record.update(cell_memory(self.spec, record["n"], record["budget"], record["prompt_tokens"]))
        self.log.append(record)
        self.count += 1
        if self.progress:
            self.progress(self.count, self.total, what, "sweep")

    def ticker(self, model: str, phase: str):
        """A ``tick(done, total)`` for a phase's own steps, or None without progress reporting."""
        if not self.progress:
            return None
        name = short(model)
        return lambda done, total: self.progress(done, total, name, phase)


def cell_memory(spec: dict, n: int, budget: int, prompt_tokens: int) -> dict:
    """``kv_bytes`` and ``memory_mb`` a direct run of the cell needs: an engine planned for its n rows of
    budget + answer tokens after this prompt (weights, KV cache, compute); None where the engine cannot tell."""
    from edgetts.engines.spec import ContextPlan, engine_memory
    from edgetts.strategies import RunConfig

    try:
        plan = engine_memory(spec, ContextPlan(n, budget + RunConfig().answer_tokens, max(1, prompt_tokens)))
    except (OSError, ValueError):  # a model that cannot be planned is still measured; its memory stays unknown
        plan = None
    if plan is None:
        return {"kv_bytes": None, "memory_mb": None}
    return {"kv_bytes": plan.kv, "memory_mb": round(plan.total_mb, 1)}


def _energy(m, seconds: float) -> dict:
    """Energy fields of a record; pooled cells scale the pool's average power to their own latency."""
    joules = m.avg_power_w * seconds if m.avg_power_w is not None else None
    return {
        "energy_j": joules,
        "avg_power_w": m.avg_power_w,
        "energy_source": m.energy_source,
        "energy_rail": m.energy_rail,
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
        "rows_used": trace.rows_used, "early_stop": trace.early_stop, "rounds": trace_rounds(s, n, trace),
        **_energy(m, trace.wall_s),
    }  # fmt: skip
    rec["energy_j"] = m.energy_j  # measured, not scaled
    ctx.write(rec, f"{short(model)} {s} n={n} b={b}")


def trace_rounds(strategy: str, n: int, trace) -> list[list[tuple[int, bool]]]:
    """The rounds of (sampled tokens, forced) of the rows a direct run decoded, in order: what a step-time
    model needs to re-time the query on another device (:mod:`edgetts.profiling.calibrate`)."""
    from edgetts.strategies import STRATEGIES

    rows = [(r.thinking_tokens + r.answer_tokens, bool(r.forced_answer)) for r in trace.rows]
    sizes = getattr(STRATEGIES[strategy], "round_sizes", None)
    out, start = [], 0
    for size in sizes(n) if sizes else [len(rows)]:
        if start < len(rows):
            out.append(rows[start : start + size])
        start += size
    if start < len(rows):
        out.append(rows[start:])
    return out or [[(0, False)]]


def run_pooled(ctx: Context, model, engine, family, cells, todo, out: Path) -> None:
    import random

    from edgetts.engines.base import SamplingParams
    from edgetts.models.families import build_prompt
    from edgetts.profiling.latency import calibrate
    from edgetts.profiling.pooled import cell_estimate, direct_rows, sample_pool

    n_max = max(n for _, n, _ in cells)
    budgets = sorted({b for *_, b in cells})
    steps = latency_model(out, model)  # a resumed profile keeps the model its records were made with
    if steps is None:
        steps = calibrate(engine, family, todo[0][1].question, n_max, tokens=min(max(budgets) + 32, 256),
                          tick=ctx.ticker(model, "calibrating"))  # fmt: skip
        write_json_atomic(_latency_file(out, "model", model), steps.to_dict())
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
                "rounds": rounds, **_energy(m, latency),
            }  # fmt: skip
            ctx.write(rec, f"{short(model)} pooled {s} n={n} b={b}")


def short(model: str) -> str:
    """A model's label for a progress line: the file name of a path (variants differ at the end)."""
    return Path(model).name if "/" in model and "@" not in model else model


def latency_model(out: Path, model: str):
    """The step-time model saved for ``model`` in ``out``, or None."""
    from edgetts.profiling.latency import StepModel

    saved, why = _read_object(_latency_file(out, "model", model))
    if why:  # missing or damaged: calibrate again
        return None
    try:
        return StepModel.from_dict(saved)
    except (ValueError, TypeError):  # an object without the model's fields
        return None


def check_latencies(ctx: Context, model, engine, family, cells, examples, out: Path) -> None:
    """Direct runs of a few pooled cells and a drift check (:mod:`edgetts.profiling.validation`)."""
    from edgetts.profiling.validation import validate

    steps = latency_model(out, model)
    if steps is None:  # no step-time model to compare with (the caller skips the check then)
        return
    records = {k: r for k, r in RecordLog(out / "records.jsonl").load().items() if r["model"] == model}
    result = validate(engine, family, model, cells, examples, records, steps, ctx.cfg,
                      lambda *cell: record_key(model, *cell), tick=ctx.ticker(model, "validating"))  # fmt: skip
    write_json_atomic(_latency_file(out, "validation", model), result)


