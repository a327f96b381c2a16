"""Build, write and validate ``edgetts.pareto/v1`` configs from profile directories.

Every cell of every profile (``summary.json``) becomes a candidate point: model artifact,
engine, strategy, n, budget, latency quantiles, accuracy with its 95% interval, energy and
memory.  Constraints filter candidates first, in the spirit of Triton Model Analyzer:
``{"energy_j": {"max": 2.0}, "memory_mb": {"max": 4096}, "accuracy": {"min": 0.5}}``.
The frontier keeps, in order of the chosen latency quantile, every point more accurate than
all faster points.  A frontier point whose accuracy interval overlaps the interval of a faster
frontier point is marked ``dominated_within_ci``: the measurements cannot tell it is better;
``strict`` drops such points.  Several profiles (model variants) merge into one frontier.

Each point names the engine that runs it as an engine spec (``engine``, ``artifact``, and
``url`` and ``engine_options`` where the engine has them; :func:`point_spec` turns a point back
into an :class:`~edgetts.engines.spec.EngineSpec`), so the runtime opens whatever engine a point
names.  Local artifact paths are stored relative to the config file's folder (built-in names
stay names, server points keep the server's model name) and resolved against it on loading,
so a config and its models can move together.

The file is written through a temporary file and a rename, never over a file that is not a
Pareto config (:mod:`edgetts.outputs`).  :func:`load_config` checks the schema version, every
required field, that the frontier is non-empty and sorted, and that every value is one a
runtime can act on (n and budget of at least 1, finite non-negative latencies, accuracies in
[0, 1]), raising :class:`ParetoError` with a one-line message naming
the field.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from edgetts.engines import REGISTRY
from edgetts.engines.base import EngineError
from edgetts.engines.spec import EngineSpec, split_settings
from edgetts.fileio import finite_number, not_a_file
from edgetts.models import BUILTIN
from edgetts.outputs import OutputError, check_output, write_text

SCHEMA = "edgetts.pareto/v1"
QUANTILES = ("p50", "p90", "p95", "p99")
METRICS = {"energy_j", "memory_mb", "accuracy", "latency_ms"}
POINT_FIELDS = {"id": str, "model": str, "artifact": str, "engine": str, "strategy": str, "n": int, "budget": int,
                "latency_ms": (int, float), "latency_quantiles_ms": dict, "accuracy": (int, float),
                "accuracy_ci95": list}  # fmt: skip


class ParetoError(ValueError):
    """A profile or config that cannot be used; the message names the field or file."""


PROFILE_FILES = ("summary.json", "sweep.json", "device.json")


def _load_profile(d: Path) -> tuple[dict, dict, dict]:
    for name in PROFILE_FILES:
        if not (d / name).is_file():
            raise ParetoError(f"{d}: not a profile directory (no {name})")
    try:
        summary, sweep, device = (json.loads((d / n).read_text()) for n in PROFILE_FILES)
    except json.JSONDecodeError as e:
        raise ParetoError(f"{d}: unreadable profile file ({e.msg})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise ParetoError(f"{d}: unreadable profile file ({getattr(e, 'strerror', None) or e})") from None
    task = sweep.get("sweep") if isinstance(sweep, dict) else None
    if not (isinstance(summary, dict) and isinstance(summary.get("cells"), list)
            and all(isinstance(c, dict) for c in summary["cells"])
            and isinstance(summary.get("latency_validation", {}), dict)
            and isinstance(task, dict) and all(k in task for k in ("dataset", "limit", "seed"))
            and isinstance(device, dict)):  # fmt: skip
        raise ParetoError(f"{d}: damaged profile files (summary.json, sweep.json or device.json is not what edgetts "
                          "writes); run edgetts profile on it again to rewrite them")  # fmt: skip
    return summary, sweep, device


def parse_constraints(spec: dict | None) -> dict:
    spec = spec or {}
    if not isinstance(spec, dict):
        raise ParetoError("constraints: expected {metric: {max: v} or {min: v}}")
    for metric, bound in spec.items():
        if metric not in METRICS:
            raise ParetoError(f"constraints: unknown metric {metric!r}; choose from {', '.join(sorted(METRICS))}")
        if not isinstance(bound, dict) or not bound or set(bound) - {"max", "min"}:
            raise ParetoError(f"constraints.{metric}: expected {{max: v}} and/or {{min: v}}")
        # NaN compares false with everything: a NaN bound would hold no point back, silently
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
                   for v in bound.values()):  # fmt: skip
            raise ParetoError(f"constraints.{metric}: bounds must be numbers")
    return spec


def _cell_spec(cell: dict) -> EngineSpec:
    """The engine spec of a summary cell (older profiles name only the model: llama.cpp)."""
    try:
        spec = EngineSpec.from_dict(cell.get("engine") or {"engine": "llama.cpp", "artifact": cell["model"]})
    except EngineError as e:
        raise ParetoError(f"summary cell {cell.get('model')!r}: {e}") from None
    if spec.url is None and spec.artifact and Path(spec.artifact).exists():
        spec = EngineSpec(spec.engine, str(Path(spec.artifact).resolve()), None, spec.options)
    return spec


def _short_name(spec: EngineSpec) -> str:
    if spec.url:
        return f"{spec.engine}:{spec.artifact or 'model'}@{urlsplit(spec.url).netloc}"
    stem = Path(spec.artifact or "").stem if spec.artifact not in BUILTIN else spec.artifact
    return stem if spec.engine == "llama.cpp" else f"{spec.engine}:{stem}"


def point_spec(point: dict) -> EngineSpec:
    """The engine spec a frontier point names, without run-time settings (a config written before
    settings moved to ``profiled_with`` still carries them in its options)."""
    spec = EngineSpec(point["engine"], point["artifact"], point.get("url"), dict(point.get("engine_options") or {}))
    return split_settings(spec)[0]


def profiled_with(point: dict) -> dict:
    """The run-time settings a point's latencies were measured under (older configs: its options')."""
    if isinstance(point.get("profiled_with"), dict):
        return point["profiled_with"]
    return split_settings(EngineSpec.from_dict({"engine": "auto", "options": point.get("engine_options") or {}}))[1]


def _point(cell: dict, quantile: str) -> dict:
    q = {k: 1000 * cell["latency_s"][k] for k in QUANTILES}
    # What the point needs (weights, KV cache and compute of an engine planned for it); the measured
    # peak where the engine cannot tell (a server), since pages never touched do not show in a peak.
    memory = cell.get("memory_mb") or cell.get("peak_gpu_mb") or cell.get("peak_rss_mb")
    spec, settings = split_settings(_cell_spec(cell))
    return {
        "id": f"{_short_name(spec)}/{cell['strategy']}/n{cell['n']}/b{cell['budget']}",
        "model": cell["model"], "artifact": spec.artifact or "", "engine": spec.engine,
        **({"url": spec.url} if spec.url else {}), **({"engine_options": spec.options} if spec.options else {}),
        "strategy": cell["strategy"],
        "n": cell["n"], "budget": cell["budget"], "latency_ms": q[quantile], "latency_quantiles_ms": q,
        "accuracy": cell["accuracy"], "accuracy_ci95": cell["accuracy_ci95"], "queries": cell["queries"],
        "energy_j": cell.get("energy_j"), "energy_source": cell.get("energy_source"),
        "energy_rail": cell.get("energy_rail"), "energy_per_correct_j": cell.get("energy_per_correct_j"),
        "memory_mb": memory,
        "tokens": cell["tokens"]["generated"], "profiled_with": cell.get("profiled_with") or settings,
    }  # fmt: skip


def _fits(p: dict, constraints: dict) -> bool:
    for metric, bound in constraints.items():
        v = p.get(metric)
        if v is None:
            return False  # an unmeasured metric cannot satisfy a constraint on it
        if ("max" in bound and v > bound["max"]) or ("min" in bound and v < bound["min"]):
            return False
    return True


def frontier(points: list[dict], strict: bool = False) -> list[dict]:
    front: list[dict] = []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["accuracy"], p["id"])):
        if front and p["accuracy"] <= front[-1]["accuracy"]:
            continue
        p = dict(p, dominated_within_ci=any(p["accuracy_ci95"][0] <= f["accuracy_ci95"][1] for f in front))
        front.append(p)
    if strict:
        front = [p for p in front if not p["dominated_within_ci"]] or front[:1]
    return front


# The settings that make a device setting (a calibration axis): the rest of profiled_with follows from them.
SETTING_KEYS = ("threads", "gpu_layers", "power_mode")


def setting_of(point: dict) -> str:
    """A point's device setting as text (``threads=2,gpu_layers=0``), from what it was profiled with."""
    was = profiled_with(point)
    return ",".join(f"{k}={was[k]}" for k in SETTING_KEYS if was.get(k) is not None)


def _has(was: dict, key: str, value) -> bool:
    """Whether settings ``was`` have ``key=value``; a power mode is named or numbered (``15W`` or ``1``)."""
    number = was.get("power_mode_id") if key == "power_mode" else None
    return was.get(key) == value or (number is not None and str(number) == str(value))


def runnable_strategies(config: dict, where: str) -> None:
    """Refuse (one line), before any engine opens, a point whose strategy this runtime does not have (a
    config validates names as data only: a C header carries any name)."""
    from edgetts.strategies import STRATEGIES

    for i, point in enumerate(config["frontier"]):
        if point["strategy"] not in STRATEGIES:
            raise ParetoError(f"{where}: frontier[{i}].strategy {point['strategy']!r} is not one of: "
                              f"{', '.join(STRATEGIES)}")  # fmt: skip


def one_setting(config: dict, where: str) -> None:
    """Refuse (one line) a config whose points were profiled under different settings: a runtime runs
    under one, and the others' latencies do not hold there."""
    seen = sorted({setting_of(p) for p in config["frontier"]})
    if len(seen) > 1:
        raise ParetoError(f"{where}: its points were profiled under {len(seen)} settings ({'; '.join(seen)}), and "
                          "a runtime runs under one; build a config per setting (edgetts pareto --setting ...)")


def build_config(profiles: list[str | Path], quantile: str = "p95", constraints: dict | None = None,
                 strict: bool = False, require_validated: bool = False,
                 setting: dict | None = None) -> tuple[dict, list[dict]]:  # fmt: skip
    """(config, every candidate point) from profile directories.

    ``require_validated`` refuses a pooled profile whose modelled latencies failed their direct
    check (``latency_validation`` in its summary); the config records every profile's check.
    Profiles of several settings (``edgetts calibrate --setting``) merge with each point's setting
    in its id (``...@threads=2``) and ``setting``; ``setting`` ({threads: 2}) keeps one.
    """
    if quantile not in QUANTILES:
        raise ParetoError(f"quantile must be one of {', '.join(QUANTILES)}, got {quantile!r}")
    constraints = parse_constraints(constraints)
    seen: dict[Path, Path] = {}
    for d in map(Path, profiles):  # one directory twice would count each of its cells twice
        if d.resolve() in seen:
            raise ParetoError(f"{d} is given twice (as {seen[d.resolve()]})" if seen[d.resolve()] != d
                              else f"{d} is given twice")  # fmt: skip
        seen[d.resolve()] = d
    candidates, device, task, checks, origin = [], None, None, {}, {}
    for d in map(Path, profiles):
        summary, sweep, dev = _load_profile(d)
        check = summary.get("latency_validation")
        if check is not None:
            checks[str(d)] = {k: check.get(k) for k in ("ok", "mape", "drift", "cells_checked")}
            models = check.get("models") if isinstance(check.get("models"), list) else []
            damaged = next((m["damaged"] for m in models if isinstance(m, dict) and m.get("damaged")), None)
            if require_validated and damaged:
                raise ParetoError(f"{d}: its latency check is damaged ({damaged}); check again (delete the file "
                                  "where it was measured and run that profile command), or pass "
                                  "--accept-unvalidated")  # fmt: skip
            if require_validated and not check.get("ok"):
                mape, drift = _ratio(check.get("mape")), _ratio(check.get("drift"))
                raise ParetoError(
                    f"{d}: its modelled latencies failed the direct check (off by "
                    f"{'n/a' if mape is None else f'{100 * mape:.0f}%'}, drift "
                    f"{'n/a' if drift is None else f'{100 * drift:+.0f}%'}; the device was probably busy); profile "
                    "again on a quiet device or with --mode direct, or pass --accept-unvalidated"
                )
        device = device or dev
        s = sweep["sweep"]
        task = task or {"dataset": s["dataset"], "limit": s["limit"], "seed": s["seed"]}
        for k, cell in enumerate(summary["cells"]):
            try:
                candidates.append(_point(cell, quantile))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ParetoError(f"{d}/summary.json: cell {k} is damaged (not what edgetts writes); run edgetts "
                                  "profile on it again to rewrite the summary") from None
            origin[id(candidates[-1])] = d
    if setting:
        candidates = [p for p in candidates if all(_has(profiled_with(p), k, v) for k, v in setting.items())]
        if not candidates:
            wanted = ", ".join(f"{k}={v}" for k, v in setting.items())
            raise ParetoError(f"no profiled cell was measured under {wanted}")
    if len({setting_of(p) for p in candidates}) > 1:  # one frontier over settings: each point says which
        for p in candidates:
            p["setting"] = setting_of(p)
            p["id"] = f"{p['id']}@{p['setting']}"
    if not candidates:
        raise ParetoError("the profiles hold no measured cells")
    seen_at: dict[str, Path] = {}
    for p in candidates:  # one point measured twice (a profile and its calibration to the same setting...)
        first = seen_at.setdefault(p["id"], origin[id(p)])
        if first != origin[id(p)]:
            raise ParetoError(f"{p['id']} is measured in both {first} and {origin[id(p)]} under the same setting: "
                              "as one point twice it would be chosen by either's latency; give one of them")
    for metric in constraints:
        if all(p.get(metric) is None for p in candidates):
            why = f" (energy source: {candidates[0].get('energy_source')})" if metric == "energy_j" else ""
            raise ParetoError(f"constraints.{metric}: no profiled point measured it{why}")
    allowed = [p for p in candidates if _fits(p, constraints)]
    if not allowed:
        raise ParetoError("no measured point satisfies the constraints")
    config = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device, "task": task,
        "objective": {"maximize": "accuracy", "latency_quantile": quantile},
        "constraints": constraints, "strict": strict, "profiles": [str(p) for p in profiles],
        "frontier": frontier(allowed, strict),
    }  # fmt: skip
    if checks:
        config["latency_validation"] = checks
    return config, candidates


def _ratio(v: object) -> float | None:
    """A check's mape or drift when it is a finite number, else None."""
    return v if finite_number(v) else None


def validation_note(config: dict, where: str) -> str | None:
    """One line when a profile behind ``config`` failed its direct latency check, else None."""
    failed = {d: c for d, c in (config.get("latency_validation") or {}).items() if isinstance(c, dict)
              and c.get("ok") is False}  # fmt: skip
    if not failed:
        return None
    off = {d: "n/a" if _ratio(c.get("mape")) is None else f"{100 * c['mape']:.0f}%" for d, c in failed.items()}
    parts = [f"{d} (off by {o})" for d, o in off.items()]
    return (f"note: {where}: the modelled latencies of {', '.join(parts)} failed their direct check; its "
            "deadlines may be missed")


def write_config(config: dict, path: str | Path) -> Path:
    """Write ``config`` to ``path`` whole or not at all; never over a file that is not a Pareto config."""
    validate(config, str(path))
    try:
        path = check_output(path, ours=_is_config)
        # Artifact paths are made relative to the folder's resolved location; write_text creates the folder.
        text = json.dumps(_paths(config, path.parent.resolve(), relative=True), indent=1, sort_keys=True) + "\n"
        return write_text(path, text)
    except OutputError as e:
        raise ParetoError(str(e)) from None
    except OSError as e:  # looking at the path (a folder that cannot be searched)
        raise ParetoError(f"cannot write {path}: {e.strerror or e}") from None


def _is_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("schema") == SCHEMA
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return False


def _paths(config: dict, base: Path, relative: bool) -> dict:
    """The config with local artifact paths made relative to ``base`` (or resolved against it)."""
    front = []
    for p in config["frontier"]:
        a = p["artifact"]
        if p.get("url") or a in BUILTIN or not a:
            front.append(p)
        elif relative and Path(a).is_absolute():
            front.append(dict(p, artifact=os.path.relpath(a, base)))
        elif not relative and not Path(a).is_absolute():
            front.append(dict(p, artifact=str((base / a).resolve())))
        else:
            front.append(p)
    return dict(config, frontier=front)


def validate(config: object, where: str = "config") -> dict:
    if not isinstance(config, dict):
        raise ParetoError(f"{where}: expected a JSON object")
    if config.get("schema") != SCHEMA:
        raise ParetoError(f"{where}: schema is {config.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("device", "task", "objective", "frontier"):
        if key not in config:
            raise ParetoError(f"{where}: missing field {key!r}")
    front = config["frontier"]
    if not isinstance(front, list) or not front:
        raise ParetoError(f"{where}: frontier is empty")
    for i, p in enumerate(front):
        for name, kind in POINT_FIELDS.items():
            if not isinstance(p, dict) or not isinstance(p.get(name), kind) or isinstance(p.get(name), bool):
                what = getattr(kind, "__name__", "number")
                raise ParetoError(f"{where}: frontier[{i}].{name} is missing or not a {what}")
        if p["engine"] not in REGISTRY:
            raise ParetoError(f"{where}: frontier[{i}].engine {p['engine']!r} is not one of: {', '.join(REGISTRY)}")
        if not isinstance(p.get("url", ""), str) or not isinstance(p.get("engine_options", {}), dict):
            raise ParetoError(f"{where}: frontier[{i}]: url must be a string and engine_options an object")
        _check_values(p, f"{where}: frontier[{i}]")
    lat = [p["latency_ms"] for p in front]
    if lat != sorted(lat):
        raise ParetoError(f"{where}: frontier is not sorted by latency_ms")
    if len({p["id"] for p in front}) != len(front):
        raise ParetoError(f"{where}: frontier ids are not unique")
    return config


def _check_values(p: dict, where: str) -> None:
    """Values a runtime can act on: positive sizes, finite non-negative measurements.  Strategy names
    are checked by what runs them (the server at start-up): a C header carries any name as data."""

    def number(v) -> bool:
        return finite_number(v) and v >= 0

    for name in ("n", "budget"):  # the C runtime's range (ints in the frontier it compiles in)
        if not 1 <= p[name] <= 1_000_000:
            raise ParetoError(f"{where}.{name} is {p[name]}; it must be from 1 to 1000000")
    if not number(p["latency_ms"]):
        raise ParetoError(f"{where}.latency_ms is {p['latency_ms']}; expected a finite number >= 0")
    q = p["latency_quantiles_ms"]
    if not all(number(v) for v in q.values()):
        raise ParetoError(f"{where}.latency_quantiles_ms: expected finite numbers >= 0")
    ci = p["accuracy_ci95"]
    if not (number(p["accuracy"]) and p["accuracy"] <= 1):
        raise ParetoError(f"{where}.accuracy is {p['accuracy']}; expected a number in [0, 1]")
    if len(ci) != 2 or not all(number(v) and v <= 1 for v in ci) or ci[0] > ci[1]:
        raise ParetoError(f"{where}.accuracy_ci95 is {ci}; expected [low, high] in [0, 1]")
    for name in ("energy_j", "memory_mb"):
        if p.get(name) is not None and not number(p[name]):
            raise ParetoError(f"{where}.{name} is {p[name]}; expected a finite number >= 0 or null")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParetoError(f"{path}: {not_a_file(path)}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ParetoError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ParetoError(f"{path}: not a text file (an edgetts.pareto/v1 config is JSON)") from None
    except RecursionError:
        raise ParetoError(f"{path}: not valid JSON (nested too deep)") from None
    return _paths(validate(config, str(path)), path.parent.resolve(), relative=False)
