"""A profile directory: what is in it, how a run claims it, and what other commands read from it.

Layout::

    device.json     the device fingerprint (edgetts.telemetry.device)
    sweep.json      the resolved sweep configuration and its digest (and its shard, if any)
    records.jsonl   one record per measured query (edgetts.profiling.records)
    summary.json    one entry per cell (edgetts.profiling.summary)
    models.json     each local model's artifact and sha256 (what edgetts calibrate checks)
    latency-model-<model>.json, latency-validation-<model>.json   a pooled profile's step-time
                    model and its direct check

A run holds the directory's lock (:mod:`edgetts.profiling.lock`) from its first look at the
directory to the summary, so a second run into it fails at once naming the holder.  A
directory made by a different sweep is refused unless ``force``; then every file of the
previous run, derived ones included, moves to ``replaced-<digest>/`` rather than being
deleted.  A directory of someone else's files is refused even with ``force``.  A damaged
``sweep.json`` or ``device.json`` next to measured records is reported as damaged, with the
repair, never as another sweep; a directory without records (a stub left by a run that failed
before measuring anything) is simply reused.  A run that fails before its first record removes
the directory it created.  The summary is computed from the records alone
(:func:`write_summary`), so a resumed or merged profile summarizes like an uninterrupted one; a
latency check file that is not what edgetts writes counts there as a failed check (``damaged``),
never as no check.  Commands that read another run's profile (:func:`read_profile`: merge,
calibrate) check its ``sweep.json`` (shard and sweep, as ``profile --config`` checks a sweep)
and ``models.json`` entries first, each refused in one line.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack, contextmanager
from fnmatch import fnmatch
from pathlib import Path

from edgetts.fileio import finite_number, write_json_atomic
from edgetts.profiling.config import ConfigError, SweepConfig
from edgetts.profiling.lock import LOCK_NAME, LockError, hold
from edgetts.profiling.records import RecordLog
from edgetts.profiling.summary import summarize

# What edgetts writes into a profile directory (besides latency-model-*.json, latency-validation-*.json and
# replaced-*/).
PROFILE_FILES = ("sweep.json", "records.jsonl", "device.json", "summary.json", "pareto.json", "pareto.png",
                 "report.html", "models.json")  # fmt: skip


class ProfileError(ValueError):
    """A profile directory that cannot be used for this sweep."""


def prepare_dir(out: Path, cfg: SweepConfig, force: bool, shard: tuple[int, int] | None = None) -> None:
    """Make the locked directory ``out`` ready for ``cfg`` (see the module docstring); a shard of a
    sweep (``(i, n)``) resumes only into a directory of the same shard."""
    sweep, device = out / "sweep.json", out / "device.json"
    odd = next((e for e in sorted(out.iterdir()) if not (e.is_file() or e.is_dir())), None)
    if odd is not None:  # a named pipe would block a read of it, a socket or device fail
        raise ProfileError(f"{odd} {NOT_OURS}")
    records = _has_records(out)
    if not records:  # new, or a stub left by a run that failed before its first record: nothing to keep
        for entry in out.iterdir():
            if entry.is_file() and entry.name != "records.jsonl" and _derived(entry.name):
                entry.unlink()
    elif sweep.exists():
        old, why = _read_sweep(sweep)
        if why:
            raise ProfileError(
                f"{sweep} is damaged ({why}) while records.jsonl holds measured queries; if they belong to this "
                "sweep, delete sweep.json and run the same command again to resume them, else use another --out"
            )
        if old.get("digest") != cfg.digest():
            if not force:
                raise ProfileError(
                    f"{out} holds a profile of a different sweep (digest {old.get('digest')}, this one "
                    f"{cfg.digest()}); use another --out, or --force to move its files aside"
                )
            _move_aside(out, str(old.get("digest")))
        elif old.get("shard") != (list(shard) if shard else None):
            was = "/".join(map(str, old["shard"])) if old.get("shard") else "the whole sweep"
            now = "/".join(map(str, shard)) if shard else "the whole sweep"
            raise ProfileError(f"{out} holds shard {was} of this sweep, not {now}; use another --out")
    if device.exists():
        _, why = _read_object(device)
        if why:
            raise ProfileError(
                f"{device} is damaged ({why}); delete it and run the same command again: this machine's "
                "fingerprint is written anew and the records are kept"
            )
    write_json_atomic(sweep, {"digest": cfg.digest(), "sweep": cfg.resolved(),
                              **({"shard": list(shard)} if shard else {})})  # fmt: skip


NOT_OURS = "is not a regular file; remove it (a profile directory holds edgetts' files)"


def _read_object(path: Path, key: str | None = None) -> tuple[dict, str | None]:
    """(the JSON object in ``path``, None), or ({}, why it is not one, or has no string ``key``)."""
    if not path.is_file():  # a named pipe would block the read
        return {}, "not a regular file"
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return {}, f"not JSON: {getattr(e, 'msg', None) or e}"
    if not isinstance(value, dict) or (key is not None and not isinstance(value.get(key), str)):
        return {}, "not the object edgetts writes"
    return value, None


def _read_sweep(path: Path) -> tuple[dict, str | None]:
    """``sweep.json`` as :func:`_read_object` reads it, its ``shard`` (where there is one) checked too: merge
    sorts, counts and names shards by it."""
    sweep, why = _read_object(path, key="digest")
    shard = sweep.get("shard")
    whole = isinstance(shard, list) and len(shard) == 2 and all(type(x) is int for x in shard)  # bool is no index
    if not why and shard is not None and not (whole and 0 <= shard[0] < shard[1]):
        return {}, "its shard is not [I, N] with 0 <= I < N"
    return sweep, why


def _model_sound(entry: object) -> bool:
    """Whether ``entry`` is a ``models.json`` entry as :func:`model_entry` writes it (merge compares and copies
    its sha256, calibrate checks files against it)."""
    if not isinstance(entry, dict):
        return False
    sha, size = entry.get("sha256"), entry.get("bytes")
    sha_ok = sha is None or (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None)
    size_ok = size is None or (type(size) is int and size >= 0)
    return isinstance(entry.get("artifact"), str) and sha_ok and size_ok


def read_profile(d: Path) -> tuple[dict, dict]:
    """(``sweep.json``, ``models.json`` or {}) of a profile directory another command reads (calibrate,
    merge); a one-line :class:`ProfileError` for a folder that is not one or a damaged sweep file."""
    for name in ("sweep.json", "records.jsonl"):
        if (d / name).exists() and not (d / name).is_file():
            raise ProfileError(f"{d / name} {NOT_OURS}")
        if not (d / name).is_file():
            raise ProfileError(f"{d}: not a profile directory (no {name})")
    sweep, why = _read_sweep(d / "sweep.json")
    if why:
        raise ProfileError(f"{d / 'sweep.json'} is damaged ({why})")
    if not isinstance(sweep.get("sweep"), dict):
        raise ProfileError(f"{d / 'sweep.json'} is damaged (it holds no sweep)")
    try:  # the sweep it measured, as profile wrote it: merge copies it, calibrate loads its dataset from it
        SweepConfig(**sweep["sweep"])
    except (ConfigError, TypeError) as e:
        raise ProfileError(f"{d / 'sweep.json'} is damaged (its sweep: {e})") from None
    models, why = _read_object(d / "models.json") if (d / "models.json").exists() else ({}, None)
    bad = next((label for label, m in models.items() if not _model_sound(m)), None)
    if bad is not None:
        why = f"model {bad!r} is not an entry edgetts writes: artifact, bytes and a sha256 of 64 hex digits"
    if why:
        raise ProfileError(f"{d / 'models.json'} is damaged ({why})")
    return sweep, models


def _has_records(out: Path) -> bool:
    try:
        return any(line.strip() for line in (out / "records.jsonl").read_bytes().splitlines())
    except FileNotFoundError:
        return False


def _move_aside(out: Path, digest: str) -> None:
    """Move every file of the previous run, derived ones included, to ``replaced-<digest>/``."""
    keep, k = out / f"replaced-{digest}", 1
    while keep.exists():  # a directory forced twice from the same sweep keeps both older runs
        k += 1
        keep = out / f"replaced-{digest}-{k}"
    keep.mkdir()
    for entry in sorted(out.iterdir()):
        if entry.name != LOCK_NAME and not entry.name.startswith("replaced-"):
            entry.rename(keep / entry.name)


def _is_ours(out: Path) -> bool:
    """Whether ``out`` is new, empty or a profile directory (never a directory of someone else's files)."""
    names = {e.name for e in out.iterdir()} - {LOCK_NAME}
    names = {n for n in names if not (n.startswith(".") and n.endswith(".tmp"))}
    return not names or "records.jsonl" in names or ("sweep.json" in names and all(map(_derived, names)))


def _derived(name: str) -> bool:
    """Whether edgetts writes files of this name into a profile directory."""
    return (name in PROFILE_FILES or name.startswith("replaced-") or fnmatch(name, "latency-model-*")
            or fnmatch(name, "latency-validation-*"))  # fmt: skip


def _refuse_foreign(out: Path) -> None:
    if not _is_ours(out):
        names = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME)
        raise ProfileError(
            f"{out} is not a profile directory (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            "; edgetts writes a profile only into a new, empty or profile directory: use another --out"
        )


@contextmanager
def profile_dir(out: Path):
    """Hold the lock of ``out`` (created if needed) for the block; a failure before the first record
    removes the directory again if this run created it, so nothing empty or partial is left."""
    if out.exists() and not out.is_dir():
        raise ProfileError(f"{out} exists and is not a directory; give --out a directory")
    made = None if out.exists() else out  # the topmost folder this run creates
    while made is not None and not made.parent.exists():
        made = made.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProfileError(f"cannot create {out}: {e.strerror}") from None
    # A directory without a lock file has never been profiled into: check it before writing the lock
    # file there.  One with a lock file is checked under the lock, where no other run changes it.
    if not (out / LOCK_NAME).exists():
        _refuse_foreign(out)
    with ExitStack() as held:
        try:
            held.enter_context(hold(out))
        except LockError as e:  # another run writes it (or the lock file is not one): a user's error, one line
            raise ProfileError(str(e)) from None
        _refuse_foreign(out)
        try:
            yield out
        except Exception:
            if made is not None and not _has_records(out):
                shutil.rmtree(made, ignore_errors=True)
            raise


def record_key(model: str, strategy: str, n: int, budget: int, repeat: int, problem: str) -> str:
    return f"{model}|{strategy}|n{n}|b{budget}|r{repeat}|{problem}"


def model_entry(spec) -> dict:
    """``models.json``'s entry for a local model: its artifact, size and sha256 (``OSError`` or
    ``ValueError`` where the artifact cannot be resolved)."""
    from edgetts.models import resolve_model
    from edgetts.quantization.manifest import digest

    artifact = resolve_model(spec.artifact)
    return {"artifact": spec.artifact, "bytes": artifact.stat().st_size, "sha256": digest(artifact)}


def write_models(out: Path, specs) -> None:
    """``models.json``: each local model's artifact and sha256 (what ``edgetts calibrate`` checks the
    artifact it re-times against), written once per model."""
    path = out / "models.json"
    known, _ = _read_object(path) if path.exists() else ({}, None)
    for spec in specs:
        if spec.url or spec.label in known:
            continue
        try:
            known[spec.label] = model_entry(spec)
        except (OSError, ValueError):
            continue
    write_json_atomic(path, known)



def _latency_file(out: Path, kind: str, model: str) -> Path:
    """``latency-model-<model>.json`` or ``latency-validation-<model>.json`` in ``out``, the model's name
    made safe for a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name)
    return out / f"latency-{kind}-{safe}.json"


def _check_unsound(check: dict) -> str | None:
    """Why ``check`` is not a latency check as :func:`edgetts.profiling.validation.check` writes it, or None."""
    cells, mape, drift = check.get("cells_checked"), check.get("mape"), check.get("drift")
    if not (isinstance(check.get("ok"), bool) and type(cells) is int and cells >= 0
            and (mape is None or finite_number(mape)) and (drift is None or finite_number(drift))):  # fmt: skip
        return "not the check edgetts writes (ok, cells_checked, mape, drift)"
    return None


def write_summary(out: str | Path) -> dict:
    """Summarize whatever records the directory holds (also after an interruption)."""
    out = Path(out)
    summary = summarize(RecordLog(out / "records.jsonl").load())
    checks = []
    for path in sorted(out.glob("latency-validation-*.json")):
        check, why = _read_object(path)
        why = why or _check_unsound(check)
        if why:  # a damaged check is a failed one: nothing says these latencies were checked
            check = {"model": path.stem.removeprefix("latency-validation-"), "cells_checked": 0, "mape": None,
                     "drift": None, "ok": False, "damaged": f"{path.name}: {why}"}  # fmt: skip
        checks.append(check)
    if checks:
        from edgetts.profiling.validation import combine

        summary["latency_validation"] = combine(checks)
    write_json_atomic(out / "summary.json", summary)
    return summary
