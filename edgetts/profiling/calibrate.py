"""``edgetts calibrate``: a profile measured anywhere, re-timed for this device and setting.

For one model artifact, what each query's rows say and how many tokens they take does not
depend on the device (same weights, seeds and sampling: the same distribution); only the time
per decode step does.  So the source profile's records keep their answers, correctness, token
counts and ``rounds`` (per round of rows, each row's sampled tokens and whether its answer was
forced), and only time is measured here:

1. the source is checked: its records must carry ``rounds`` (profiles made before they did
   cannot be re-timed), and each model's artifact here must have the sha256 the source recorded
   in ``models.json`` (another file would sample other tokens), or for a model the source
   measured through a server, be the file the user names (:mod:`edgetts.profiling.source`);
2. per model, the engine opens under the requested settings (``threads``, ``gpu_layers``; a
   ``power_mode`` is switched by the user's command and read back before anything is measured)
   and the pooled profiler's step-time model is fitted (:func:`edgetts.profiling.latency.calibrate`,
   fixed shapes, seconds on the tiny model), with the energy meter running where one exists;
3. every record's latency is replayed from its rounds on that model (prefill at the fitted cost
   per token, one step per token of the longest live row, the forced answer's tokens);
4. anchors: every cell is run directly on the first problems, problem by problem with every cell
   on each as a direct profile runs them, for ``anchor_s`` seconds (one problem at least,
   ``ANCHOR_MAX`` at most), and each cell's records are scaled by its own factor, direct over
   replayed seconds on the same problems and seeds (the same rows), pulled toward the median
   factor where a cell has few problems: what a fit on fixed shapes misses on this device
   (scheduling, a CPU quota, clocks) shows in whole calls, and not by the same factor for every
   shape (under a CPU quota a call of 8 rows slowed 3.3x where one of a single row slowed 2.4x);
   and each cell's times are spread by its anchors' deviations from that factor
   (:func:`cell_spread`, :func:`spread_cell`), so that a device that stalls calls now and then has
   the tail (the p95 a policy reads) it shows; energy is the measured average power times the
   corrected latency;
5. a few cells are run directly on problems no anchor ran and compared with their latencies,
   as pooled profiles check themselves (``latency_validation``, with each cell's anchors and
   factor; :mod:`edgetts.profiling.validation`); where that check fails (the device changed
   speed while it measured), steps 2-5 run once more (``ATTEMPTS``), and a second failure is
   said and recorded as the first would be.

The result is a profile directory like any other: this device's ``device.json``, the source's
sweep (with ``calibrated_from``), the re-timed records (``mode`` ``calibrated``, ``profiled_with``
the settings measured here) and a summary whose accuracies and intervals are the source's.
:func:`calibrate_settings` runs one calibration per setting; where they switch power modes, the
device is set back to the mode it was in at the end, whatever happened.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from statistics import median

from edgetts.engines.offload import MAX_LAYERS
from edgetts.fileio import write_json_atomic
from edgetts.profiling.directory import (
    ProfileError,
    _latency_file,
    _read_object,
    model_entry,
    profile_dir,
    record_key,
    write_summary,  # fmt: skip
)
from edgetts.profiling.power_modes import set_back, switch_power_mode
from edgetts.profiling.source import local_spec, parse_artifacts, read_source, served_models
from edgetts.telemetry.device import power_mode_query

SETTINGS = {"threads": int, "gpu_layers": int, "power_mode": str}
ANCHOR_S = 30.0  # default seconds of direct calls for the anchors (the fit and the check take the rest of a minute)
ANCHOR_MAX = 20  # problems per cell at most: beyond that a factor moves less than the device's own noise
SHRINK = 2.0  # problems' worth of the overall factor a cell's own factor is pulled toward (few problems: noisy)
SPREAD_MIN = 5  # calls a cell needs for its own spread (fewer: every cell's together)
ANY = ("*", 0, 0)  # the factors' key for the overall factor (a cell no anchor ran)
# Measurements per model at most: one whose own check fails (the device changed speed while it measured,
# as a busy machine's does) is made again once, as a user would; a second failure is said and kept.
ATTEMPTS = 2
log = logging.getLogger("edgetts.profiling")


def parse_setting(text: str) -> dict:
    """``threads=2`` or ``threads=2,gpu_layers=0`` (also ``power_mode=15W``) as a dict; one-line errors."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in SETTINGS or not value.strip():
            raise ProfileError(f"--setting {text!r}: expected KEY=VALUE with KEY one of {', '.join(SETTINGS)}")
        if key in out:
            raise ProfileError(f"--setting {text!r}: {key} is given twice")
        try:
            out[key] = SETTINGS[key](value.strip())
        except ValueError:
            raise ProfileError(f"--setting {text!r}: {key} must be a whole number") from None
        if (key == "threads" and out[key] < 1) or (key == "gpu_layers" and not -1 <= out[key] <= MAX_LAYERS):
            raise ProfileError(f"--setting {text!r}: threads must be >= 1 and gpu_layers from -1 to {MAX_LAYERS}")
        if key == "power_mode" and not re.fullmatch(r"[\w.+-]{1,64}", out[key], re.ASCII):
            # a mode is a number or a name (MAXN, 15W, MAXN_SUPER): nothing that breaks a line or a command
            raise ProfileError(f"--setting {text!r}: a power mode is a number or a name of letters, digits "
                               "and _ . + - (as nvpmodel -q prints it)")  # fmt: skip
    return out


def setting_name(setting: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items()) or "default"


def calibrate_profile(src: str | Path, out: str | Path, setting: dict | None = None, model_dir: str | None = None,
                      switch: str | None = None, memory_mb: float | None = None, progress=None,
                      anchor_s: float = ANCHOR_S, artifacts: list[str] | None = None) -> dict:  # fmt: skip
    """Re-time the profile ``src`` for this device under ``setting`` into ``out`` (new or empty); returns
    the summary (see the module doc).  ``artifacts``: ``--artifact`` values, the files here of models the
    source measured through a server (:mod:`edgetts.profiling.source`)."""
    src, out, setting = Path(src), Path(out), dict(setting or {})
    sweep_file, records, models = read_source(src)
    if out.resolve() == src.resolve():
        raise ProfileError(f"--out {out} is the source profile: calibrate into a new directory")
    from edgetts.profiling.config import SweepConfig
    from edgetts.tasks.datasets import load_dataset

    cfg = SweepConfig(**sweep_file["sweep"])
    examples = load_dataset(cfg.dataset, limit=cfg.limit, seed=cfg.seed)
    with profile_dir(out):
        if any(p.name != ".edgetts-lock" for p in out.iterdir()):
            raise ProfileError(f"{out} is not empty: calibrate into a new directory")
        by_model: dict[str, dict] = {}
        for key, rec in records.items():
            by_model.setdefault(rec["model"], {})[key] = rec
        given = parse_artifacts(artifacts, served_models(by_model))
        # every model's file found before anything is measured or switched: a missing second one must not
        # leave the first one's measurements behind
        specs = {label: local_spec(label, recs, models, model_dir, given) for label, recs in by_model.items()}
        named = [label if checked else spec.label for label, (spec, checked) in specs.items()]
        if len(set(named)) < len(named):  # two servers' models run here as one file: one model's records
            twice = sorted({n for n in named if named.count(n) > 1})
            raise ProfileError(f"the source's models would be timed here as one file twice ({', '.join(twice)}): "
                               "calibrate a profile of each server's model on its own")  # fmt: skip
        if "power_mode" in setting:  # after the checks: a refused calibration leaves the device's mode alone
            switch_power_mode(setting["power_mode"], switch)
        t0 = time.perf_counter()
        retimed, files = {}, {}
        for label, recs in by_model.items():
            spec, checked = specs[label]
            new = _retime(label, recs, spec, cfg, examples, setting, memory_mb, out, progress, anchor_s)
            if not checked:  # measured through a server: its records now name the file that ran here
                # models.json names the file that ran here: a calibration of this profile checks it
                new, models = _relabel(new, spec), {**models, spec.label: model_entry(spec)}
                files[label] = {"file": spec.artifact, "artifact_checked": False}
                log.warning("note: %s was measured through a server: nothing can check that %s is the file it ran (no "
                            "sha256 there); the accuracies are the source's only if it is", label, spec.artifact)
            retimed.update(new)
        _write(out, src, sweep_file, models, retimed, setting, time.perf_counter() - t0, files)
        return write_summary(out)


def _relabel(records: dict, spec) -> dict:
    """``records`` under the model label of ``spec`` (the file that ran here), keys included."""
    out = {}
    for r in records.values():
        key = record_key(spec.label, r["strategy"], r["n"], r["budget"], r["repeat"], r["problem"])
        out[key] = {**r, "model": spec.label, "key": key, "source_model": r["model"]}
    return out


def _retime(label, recs, spec, cfg, examples, setting, memory_mb, out, progress, anchor_s) -> dict:
    from edgetts.engines import open_engine
    from edgetts.engines.spec import serving_threads
    from edgetts.profiling.latency import calibrate
    from edgetts.profiling.runner import _energy
    from edgetts.profiling.validation import PROBLEMS, validate
    from edgetts.strategies import RunConfig
    from edgetts.telemetry.device import with_power_mode
    from edgetts.telemetry.meters import QueryMeter

    spec = spec.with_options(threads=setting.get("threads") or serving_threads(), gpu_layers=setting.get("gpu_layers"))
    cells = sorted({cell_of(r) for r in recs.values()})
    n_max, budgets = max(n for _, n, _ in cells), sorted({b for *_, b in cells})
    answer = RunConfig().answer_tokens
    engine, family = open_engine(spec, max_rows=n_max, max_tokens=max(budgets) + answer, memory_mb=memory_mb)
    name = Path(label).name

    def tick(phase):
        return (lambda done, total: progress(done, total, name, phase)) if progress else None

    def key(*cell):
        return record_key(label, *cell)

    def measure(last: bool) -> tuple[dict, dict]:
        """The fit, the anchors and the check once: (re-timed records, the check's result)."""
        meter = QueryMeter()
        with meter.measure() as measured:
            steps = calibrate(engine, family, examples[0].question, n_max, tokens=min(max(budgets) + 32, 256),
                              tick=tick("calibrating"))  # fmt: skip
        power = measured()
        write_json_atomic(_latency_file(out, "model", label), steps.to_dict())
        new = {k: _replayed(rec, steps, forced_len, 1.0) for k, rec in recs.items()}
        # Anchors: every cell run directly on the first problems, as long as the time allows, gives the
        # factor by which whole calls of that shape here differ from the model (what a fixed-shape fit
        # misses on this device: scheduling, a quota, clocks; it differs by shape).
        pairs, used = anchor(engine, family, cells, examples, new, cfg, key, anchor_s, tick("anchoring"))
        factors = cell_factors(pairs)
        spread = cell_spread(pairs, factors)
        factor = {k: factors.get(cell_of(rec), factors[ANY]) for k, rec in recs.items()}
        by_cell: dict = {}  # cell: {key: factor x modelled seconds}
        for k, rec in recs.items():
            by_cell.setdefault(cell_of(rec), {})[k] = factor[k] * new[k]["latency_s"]
        for cell, scaled in by_cell.items():
            for k, seconds in spread_cell(scaled, spread.get(cell) or spread[ANY]).items():
                timed = _replayed(recs[k], steps, forced_len, factor[k], seconds - scaled[k])
                new[k] = {**timed, **_energy(power, timed["latency_s"]), "profiled_with": settings,
                          "engine": spec.to_dict()}  # fmt: skip
        # The check: problems no anchor ran (where the sweep has them), as pooled profiles check themselves.
        held_out = examples[used:] if len(examples) - used >= PROBLEMS else examples
        result = validate(engine, family, label, cells, held_out, new, steps, cfg, key, tick=tick("validating"),
                          warn=last)  # fmt: skip
        result.update({"anchors": [{"strategy": s, "n": n, "budget": b, "problems": len(p),
                                    "factor": factors[(s, n, b)]} for (s, n, b), p in pairs.items()],
                       "anchor_problems": used, "correction": factors[ANY]})  # fmt: skip
        return new, result

    try:
        forced_len = engine.count_tokens(family.think_end + family.answer_prefix)
        settings = with_power_mode(engine.settings())
        for attempt in range(1, ATTEMPTS + 1):
            new, result = measure(attempt == ATTEMPTS)
            result["attempts"] = attempt
            if result["ok"] or attempt == ATTEMPTS:
                break
            drift = result["drift"]
            log.warning("%s: the calibration's check failed (off by %s, drift %s: the device changed speed while it "
                        "measured); measuring again", name, "n/a" if result["mape"] is None else
                        f"{100 * result['mape']:.0f}%", "n/a" if drift is None else f"{100 * drift:+.0f}%")  # fmt: skip
        write_json_atomic(_latency_file(out, "validation", label), result)
    finally:
        engine.close()
    return new


def anchor(engine, family, cells, examples, records, cfg, key, seconds: float, tick=None) -> tuple[dict, int]:
    """Run every cell directly on problem 0, then every cell on problem 1, and so on, as a direct profile
    runs its cells, until ``seconds`` have passed (one problem at least, ``ANCHOR_MAX`` at most), with the
    records' seeds: each cell's calls then spread over the whole time, and a device whose speed moves
    from one second to the next (a CPU quota, other work) moves every cell's factor alike.  Returns
    ({cell: [(direct s, modelled s), ...]}, the problems used)."""
    from edgetts.engines.base import SamplingParams
    from edgetts.profiling.latency import Ticks
    from edgetts.strategies import RunConfig, create

    sampling = SamplingParams(temperature=cfg.temperature, seed=cfg.seed)  # the pool's seeds of repeat 0
    pairs: dict = {c: [] for c in cells}
    most = min(ANCHOR_MAX, len(examples))
    step, used, t0 = Ticks(len(cells) * most, tick), 0, time.perf_counter()
    for ex in examples[:most]:  # problem by problem, every cell on each: a drift reaches every factor alike
        if used and time.perf_counter() - t0 > seconds:
            break
        for s, n, b in cells:
            rec = records.get(key(s, n, b, 0, ex.id))
            if rec is not None:
                trace = create(s, engine, family, RunConfig(n=n, budget=b, sampling=sampling)).run(ex.question)
                pairs[(s, n, b)].append((trace.wall_s, rec["latency_s"]))
            step()
        used += 1
    return pairs, used


def cell_factors(pairs: dict) -> dict:
    """Each cell's factor, direct over modelled seconds (a ratio of sums, so long problems weigh as they do in
    the cell's mean; a call over twice the cell's median ratio, stalled by another process, left out), pulled
    toward the cells' median factor by ``SHRINK`` problems' worth; ``ANY``: that median."""

    def ratio(ps):
        kept = _ordinary(ps)
        return (sum(d for d, _ in kept) / sum(m for _, m in kept), len(kept)) if kept else None

    own = {cell: r for cell, r in ((c, ratio(ps)) for c, ps in pairs.items()) if r is not None}
    overall = median(f for f, _ in own.values()) if own else 1.0
    out = {cell: (f * k + overall * SHRINK) / (k + SHRINK) for cell, (f, k) in own.items()}
    return {**out, ANY: overall}


def _ordinary(pairs: list) -> list:
    """The (direct, modelled) pairs of ordinary calls: a call over twice the median ratio (stalled by another
    process) left out."""
    ps = [(d, m) for d, m in pairs if m > 0]
    mid = median(d / m for d, m in ps) if ps else 0.0
    return [(d, m) for d, m in ps if d / m <= 2 * mid]


def cell_spread(pairs: dict, factors: dict) -> dict:
    """Each anchored cell's calls' deviations from what its factor predicts (direct less factor x modelled
    seconds; the calls :func:`cell_factors` leaves out left out), centred on 0 so that the cell's mean
    stays its factor's; ``ANY``: every cell's together (``[0.0]`` without anchors), for the cells with
    fewer than ``SPREAD_MIN`` calls.  A device that stalls calls now and then (a CPU quota's throttled
    periods, a scheduler's) lengthens the tail of every cell, the quantiles a policy reads, by about as
    much whatever the call's length: the modelled times alone, each scaled by its cell's mean factor,
    have no such tail."""

    def deviations(cell, ps):
        out = [d - factors[cell] * m for d, m in _ordinary(ps)]
        centre = sum(out) / len(out) if out else 0.0
        return [e - centre for e in out]

    own = {cell: e for cell, e in ((c, deviations(c, ps)) for c, ps in pairs.items()) if e}
    every = [e for es in own.values() for e in es] or [0.0]
    return {**{c: e for c, e in own.items() if len(e) >= SPREAD_MIN}, ANY: every}


def spread_cell(scaled: dict, deviations: list[float]) -> dict:
    """One cell's records' seconds (key: factor x modelled) as this device shows them: the k-th shortest of N
    gets the quantile at (k + 1/2) / N of every record's time plus every deviation (each record met by
    each stall seen), never less than half its own.  The cell's times then have the device's tail with
    little noise of their own (one deviation drawn per record would put a rare stall on two records or
    none), keep their order, and keep their mean where the deviations are centred."""
    order = sorted(scaled, key=lambda k: (scaled[k], k))
    every = sorted(s + e for s in scaled.values() for e in deviations)
    return {k: max(every[int((i + 0.5) / len(order) * len(every))], scaled[k] / 2) for i, k in enumerate(order)}


def cell_of(rec: dict) -> tuple:
    """The cell a record, a summary cell or a frontier point belongs to: (strategy, n, budget)."""
    return rec["strategy"], rec["n"], rec["budget"]


def _replayed(rec: dict, steps, forced_len: int, factor: float, extra: float = 0.0) -> dict:
    """``rec`` re-timed: its rounds replayed on the step-time model, times the anchors' ``factor``, plus
    ``extra`` seconds (:func:`spread_cell`)."""
    ttft = steps.token_s * (rec["prompt_tokens"] + 1)
    rounds = [[(int(s), bool(f)) for s, f in rnd] for rnd in rec["rounds"]]
    latency = steps.latency(ttft, rec["prompt_tokens"], rounds, forced_len) * factor + extra
    # ``extra`` is a drawn deviation and may be negative: a first token never comes after the answer
    ttft = min(ttft * factor, latency / len(rounds))
    longest = max(s for rnd in rounds for s, _ in rnd)
    return {**rec, "mode": "calibrated", "source_mode": rec.get("source_mode", rec.get("mode")), "latency_s": latency,
            "ttft_s": ttft, "tpot_s": (latency - ttft * len(rounds)) / max(1, longest - 1)}


def _write(out: Path, src: Path, sweep_file: dict, models: dict, records: dict, setting: dict, seconds: float,
           files: dict | None = None) -> None:  # fmt: skip
    from edgetts.profiling.records import RecordLog
    from edgetts.telemetry.device import fingerprint

    source_device, _ = _read_object(src / "device.json") if (src / "device.json").exists() else ({}, None)
    write_json_atomic(out / "device.json", fingerprint())
    write_json_atomic(out / "sweep.json", {
        **sweep_file, "calibrated_from": {"profile": str(src), "device": source_device, "setting": setting,
                                          "seconds": round(seconds, 2), **({"artifacts": files} if files else {})},
    })  # fmt: skip
    write_json_atomic(out / "models.json", models)
    log = RecordLog(out / "records.jsonl")
    for key in sorted(records):
        log.append(records[key])


def calibrate_settings(src, out, settings: list[dict], switch=None, model_dir=None, memory_mb=None, progress=None,
                       say=print, anchor_s: float = ANCHOR_S, artifacts: list[str] | None = None,
                       ) -> list[tuple[str, Path, dict]]:  # fmt: skip
    """Each of ``settings`` into ``out/<setting>`` (or ``out`` itself for one setting); returns (name, dir,
    summary) per setting."""
    settings = settings or [{}]
    if model_dir is not None and not Path(model_dir).is_dir():
        raise ProfileError(f"--model-dir {model_dir}: no such folder")
    if switch and not any("power_mode" in s for s in settings):  # a flag that would do nothing: say so
        raise ProfileError("--switch sets power modes: give it with --setting power_mode=M")
    if switch and "{power_mode}" not in switch and len({s.get("power_mode") for s in settings}) > 1:
        raise ProfileError("--switch has no {power_mode} in it: it would set the same mode for every setting")
    names = [setting_name(s) for s in settings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # before anything is measured: the second would find the first's directory
        raise ProfileError(f"--setting {', '.join(twice)} is given more than once")
    # the device's mode before: set back at the end, whatever happened (a Jetson left at 7W is a slow robot)
    before = power_mode_query() if any("power_mode" in s for s in settings) else None
    done = []
    try:
        for setting in settings:
            name = setting_name(setting)
            target = Path(out) if len(settings) == 1 else Path(out) / name
            t0 = time.perf_counter()
            summary = calibrate_profile(src, target, setting, model_dir, switch, memory_mb, progress, anchor_s,
                                        artifacts)
            check = summary.get("latency_validation") or {}
            say(f"calibrated {name} into {target} in {time.perf_counter() - t0:.1f} s"
                + (f" (latency check {'ok' if check.get('ok') else 'FAILED'}: off by "
                   f"{100 * (check.get('mape') or 0):.0f}%)" if check else ""))  # fmt: skip
            done.append((name, target, summary))
    finally:
        if before is not None:
            set_back(before, switch, say)
    return done
