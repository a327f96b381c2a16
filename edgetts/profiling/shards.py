"""A sweep spread over machines: shard indices, and ``edgetts merge`` of the shards' directories.

``edgetts profile --shard I/N`` measures every N-th problem from the I-th (so each shard spans
the levels), into a directory whose ``sweep.json`` names its shard.  The index may come from
the scheduler instead (``--shard N``): Kubernetes indexed Jobs set ``JOB_COMPLETION_INDEX``
(from 0), Slurm job arrays ``SLURM_ARRAY_TASK_ID`` (from ``SLURM_ARRAY_TASK_MIN``).  Record keys
do not depend on the shard, so the shards' records together are the unsplit sweep's.

:func:`merge` joins shard directories of one sweep (the same digest, checked) into a new
profile directory: records deduplicated by key (a shard run twice counts once), ``models.json``
united (the same artifact everywhere, by sha256), each shard's latency check kept
(``latency-validation-<model>-shard<I>.json``) and the summary and its intervals recomputed from
the records alone.  Shards missing from the set are named in the result (``missing_shards``), and
the settings where shards were measured under several (``mixed_settings``); a calibration joins
only calibrations to its own setting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgetts.fileio import write_json_atomic
from edgetts.pareto.config import setting_of
from edgetts.profiling.directory import ProfileError, profile_dir, read_profile, write_summary
from edgetts.profiling.records import RecordLog

ENV_INDEX = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")
MISSING_LISTED = 10  # missing shards named one by one in sweep.json and the warning; the rest are counted


def parse_shard(text: str, env: dict | None = None) -> tuple[int, int]:
    """``I/N``, or ``N`` with the index from the scheduler's environment; a one-line error otherwise."""
    env = os.environ if env is None else env
    index, sep, count = text.strip().rpartition("/")
    if not sep:
        name = next((k for k in ENV_INDEX if env.get(k, "").strip()), None)
        if name is None:
            raise ProfileError(f"--shard {text}: give I/N, or set {' or '.join(ENV_INDEX)} for the index")
        try:
            low = int(env.get("SLURM_ARRAY_TASK_MIN", 0) or 0) if name == "SLURM_ARRAY_TASK_ID" else 0
            index = str(int(env[name]) - low)
        except ValueError:
            raise ProfileError(f"--shard {text}: {name}={env[name]!r} (or its array's minimum) is not a whole "
                               "number") from None  # fmt: skip
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ProfileError(f"--shard {text}: expected I/N with whole numbers (0 <= I < N)") from None
    if not (n >= 1 and 0 <= i < n):
        raise ProfileError(f"--shard {text}: the index must be from 0 to N-1 and N at least 1, got {i}/{n}")
    return i, n


def merge(dirs: list[str | Path], out: str | Path) -> dict:
    """Join the shard directories ``dirs`` of one sweep into ``out`` (new or empty); returns the summary
    with ``shards`` (those merged) and ``missing_shards``."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ProfileError("nothing to merge: give the shards' profile directories")
    out = Path(out)
    if any(out.resolve() == d.resolve() for d in dirs):
        raise ProfileError(f"--out {out} is one of the shards: merge into a new directory")
    sweeps, models = [], {}
    for d in dirs:
        sweep, m = read_profile(d)
        if sweeps and sweep["digest"] != sweeps[0]["digest"]:
            raise ProfileError(f"{d} holds another sweep (digest {sweep['digest']}, {dirs[0]} has "
                               f"{sweeps[0]['digest']}): only shards of one sweep merge")  # fmt: skip
        for label, entry in m.items():
            if label in models and models[label].get("sha256") != entry.get("sha256"):
                raise ProfileError(f"{d}: model {label} has another sha256 than in {dirs[0]}: shards must run "
                                   "the same artifact")  # fmt: skip
            models.setdefault(label, entry)
        sweeps.append(sweep)
    shards = sorted({tuple(s["shard"]) for s in sweeps if s.get("shard")})
    counts = {n for _, n in shards}
    if len(counts) > 1:
        raise ProfileError(f"the shards split the sweep differently ({', '.join(f'{i}/{n}' for i, n in shards)})")
    missing = _missing(shards)
    _one_timing(dirs, sweeps)
    records: dict[str, dict] = {}
    settings: dict[str, list[str]] = {}  # setting -> the directories measured under it
    for d in dirs:
        for key, rec in RecordLog(d / "records.jsonl").load(repair=False).items():  # read only
            records.setdefault(key, rec)  # the same query measured by two runs of a shard counts once
            where = settings.setdefault(setting_of(rec), [])
            if str(d) not in where:
                where.append(str(d))
    with profile_dir(out):
        if any(p.name != ".edgetts-lock" for p in out.iterdir()):
            raise ProfileError(f"{out} is not empty: merge into a new directory")
        write_json_atomic(out / "sweep.json", {
            "digest": sweeps[0]["digest"], "sweep": sweeps[0]["sweep"],
            "merged_from": [str(d) for d in dirs], "shards": [f"{i}/{n}" for i, n in shards],
            "missing_shards": missing, "mixed_settings": sorted(settings) if len(settings) > 1 else [],
        })  # fmt: skip
        if (dirs[0] / "device.json").is_file():
            shutil.copyfile(dirs[0] / "device.json", out / "device.json")
        write_json_atomic(out / "models.json", models)
        for k, (d, sweep) in enumerate(zip(dirs, sweeps)):
            tag = f"shard{sweep['shard'][0]}" if sweep.get("shard") else f"part{k}"
            for f in sorted(d.glob("latency-validation-*.json")) + sorted(d.glob("latency-model-*.json")):
                shutil.copyfile(f, out / f"{f.stem}-{tag}.json")
        log = RecordLog(out / "records.jsonl")
        for key in sorted(records):
            log.append(records[key])
        summary = write_summary(out)
    return {**summary, "shards": [f"{i}/{n}" for i, n in shards], "missing_shards": missing,
            "mixed_settings": dict(sorted(settings.items())) if len(settings) > 1 else {}}


def _missing(shards: list[tuple[int, int]], listed: int = MISSING_LISTED) -> list[str]:
    """The shards of the split that were not given, the first ``listed`` of them by name and the rest as a
    count (``"... and 97 more of N"``): N comes from a file and may be any number, so nothing here counts
    to N."""
    if not shards:
        return []
    n, given = shards[0][1], {i for i, _ in shards}
    names, i = [], 0
    while i < n and len(names) < listed:
        if i not in given:
            names.append(f"{i}/{n}")
        i += 1
    rest = n - len(given) - len(names)
    return names + ([f"... and {rest} more of {n}"] if rest > 0 else [])


def _one_timing(dirs: list[Path], sweeps: list[dict]) -> None:
    """Refuse (one line) to join a calibration (records re-timed for one device and setting) with measured
    shards or with a calibration to another setting: each record would keep its own device's latency and
    a cell's would be neither's.  Measured shards from several machines join (the accuracy is the
    artifact's); where their settings differ, the merge says so (``mixed_settings``)."""

    def kind(sweep: dict) -> dict | None:  # None: measured; else the setting it was calibrated to
        return (sweep.get("calibrated_from") or {}).get("setting") if "calibrated_from" in sweep else None

    def say(k: dict | None) -> str:
        named = ",".join(f"{a}={b}" for a, b in k.items()) if isinstance(k, dict) else ""
        return "measured" if k is None else f"a calibration to {named or 'its default setting'}"

    for d, sweep in zip(dirs[1:], sweeps[1:]):
        if kind(sweep) != kind(sweeps[0]):
            raise ProfileError(f"{d} is {say(kind(sweep))} and {dirs[0]} is {say(kind(sweeps[0]))}: only shards "
                               "timed alike merge (calibrate the merged profile instead)")  # fmt: skip


def describe(result: dict) -> str:
    cells = len(result["cells"])
    missing = f"; missing shard(s) {', '.join(result['missing_shards'])}" if result["missing_shards"] else ""
    return f"{cells} cells from shard(s) {', '.join(result['shards']) or '(unsharded)'}{missing}"

