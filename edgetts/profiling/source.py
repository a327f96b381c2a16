"""What ``edgetts calibrate`` re-times: the source profile's records, checked, and each model's file here.

:func:`read_source` reads the source profile read-only (another run may still be writing it) and
refuses, in one line, records that lack what re-timing needs (each round's per-row token
counts, ``rounds``) or that are not what edgetts writes.

:func:`local_spec` finds the file that runs each of the source's models here:

* a model the source ran locally must be the same file, by the sha256 its ``models.json``
  recorded: looked for by name in ``--model-dir``, else at the source's path (a built-in model
  where edgetts is installed);
* a model the source measured through a server (``openai-http``) has no file there to hash: the
  file is ``--artifact FILE`` (``MODEL=FILE`` where the source has several), else the served
  model name as a built-in name, a path, or a file of that name in ``--model-dir``.  Nothing can
  check that it is the file the server ran, so the calibration says so and records it
  (``artifact_checked: false``); its HTTP options go, the reasoning family stays.
"""

from __future__ import annotations

from pathlib import Path

from edgetts.profiling.directory import ProfileError, read_profile


def read_source(src: Path) -> tuple[dict, dict, dict]:
    """(sweep file, records by key, models.json) of the source profile, checked (see the module doc)."""
    from edgetts.profiling.records import RecordLog

    sweep, models = read_profile(src)
    records = RecordLog(src / "records.jsonl").load(repair=False)  # another run's file: read only
    if not records:
        raise ProfileError(f"{src}: the profile holds no records to re-time")
    lacking = sum(1 for r in records.values() if not isinstance(r.get("rounds"), list) or not r["rounds"])
    if lacking:
        raise ProfileError(f"{src}: {lacking} of {len(records)} records lack per-row token counts (rounds), which "
                           "re-timing needs; profile the source again with this version of edgetts")  # fmt: skip
    damaged = [k for k, r in records.items() if not _sound(r)]
    if damaged:
        raise ProfileError(f"{src}: {len(damaged)} of {len(records)} records are damaged (their problem, "
                           "repeat, prompt tokens or rounds are not what edgetts writes), the first "
                           f"{damaged[0]!r}")  # fmt: skip
    return sweep, records, models


def _sound(rec: dict) -> bool:
    """Whether a record holds what re-timing reads beyond what every reader of the log checks (its model,
    cell and timings: :data:`edgetts.profiling.summary.RECORD_FIELDS`), of the types edgetts writes (a
    hand-edited or damaged file must fail in one line, not in the middle of the arithmetic)."""

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**9

    try:
        return (count(rec["prompt_tokens"]) and count(rec["repeat"]) and isinstance(rec["problem"], str)
                and all(isinstance(rnd, list) and rnd and all(isinstance(row, list) and len(row) == 2
                                                                and count(row[0]) and isinstance(row[1], bool)
                                                                for row in rnd)
                        for rnd in rec["rounds"]))  # fmt: skip
    except (KeyError, TypeError):
        return False


def served_models(by_model: dict[str, dict]) -> dict[str, str]:
    """{label: served model name} of the source's models measured through a server (records by model)."""
    out = {}
    for label, recs in by_model.items():
        engine = next(iter(recs.values())).get("engine")
        if isinstance(engine, dict) and engine.get("url"):
            out[label] = engine.get("artifact") or label
    return out


def parse_artifacts(values: list[str] | None, served: dict[str, str]) -> dict[str, str]:
    """``--artifact`` values as {source model label: file}: ``MODEL=FILE`` (MODEL the label or the served
    name), or ``FILE`` alone where the source measured one model through a server; ``served`` maps those
    models' labels to their served names."""
    out: dict[str, str] = {}
    if values and not served:
        raise ProfileError("--artifact names the file of a model the source measured through a server; this source "
                           "ran its models here (their files are found by sha256: give --model-dir)")  # fmt: skip
    for value in values or []:
        name, sep, file = value.partition("=")
        label = next((k for k, v in served.items() if sep and name in (k, v)), None)
        if label is None:
            if len(served) != 1:
                known = ", ".join(sorted(served.values())) or "none"
                raise ProfileError(f"--artifact {value}: give MODEL=FILE, MODEL one of the models the source "
                                   f"measured through a server ({known})")  # fmt: skip
            label, file = next(iter(served)), value
        if label in out:
            raise ProfileError(f"--artifact: {served[label]} is given twice")
        out[label] = file
    return out


def local_spec(label: str, recs: dict, models: dict, model_dir: str | None, artifacts: dict[str, str]):
    """(engine spec of the source's model ``label`` here, without settings; whether its file is checked to be
    the source's by sha256)."""
    from edgetts.engines import EngineSpec
    from edgetts.engines.spec import GENERIC_OPTIONS, split_settings

    spec, _ = split_settings(EngineSpec.from_dict(next(iter(recs.values()))["engine"]).resolved())
    if not spec.url:
        return EngineSpec(spec.engine, _artifact(label, spec, models, model_dir), None, spec.options), True
    file = _served_artifact(label, spec, model_dir, artifacts.get(label))
    keep = {k: v for k, v in spec.options.items() if k in GENERIC_OPTIONS}  # the family; not the HTTP options
    return EngineSpec("auto", file, None, keep).resolved(), False


def _artifact(label: str, spec, models: dict, model_dir: str | None) -> str:
    """The artifact to open here for the source's model ``label``: the same file (sha256), found by its name
    in ``model_dir``, else at the source's path."""
    from edgetts.models import BUILTIN
    from edgetts.quantization.manifest import digest

    want = models.get(label, {}).get("sha256")
    if not want:
        raise ProfileError(f"the source profile does not record the sha256 of {label} (models.json); profile it "
                           "again with this version of edgetts")  # fmt: skip
    source = Path(BUILTIN.get(spec.artifact, spec.artifact)).expanduser()
    # --model-dir first, then where the source found it (a built-in model is where edgetts is installed)
    places = ([Path(model_dir) / source.name] if model_dir is not None else []) + [source]
    found = [p for p in places if p.is_file()]
    if not found:
        raise ProfileError(f"{places[0]}: no such model file here (give --model-dir, the folder that holds it)")
    path = next((p for p in found if digest(p) == want), None)
    if path is None:
        raise ProfileError(f"{found[0]} is not the artifact the source profiled (sha256 differs): a different file "
                           "samples different tokens, so its accuracy is not the source's")  # fmt: skip
    return spec.artifact if path == source and spec.artifact in BUILTIN else str(path)


def _served_artifact(label: str, spec, model_dir: str | None, given: str | None) -> str:
    """The file here for a model the source measured through a server (see the module doc)."""
    from edgetts.models import BUILTIN

    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise ProfileError(f"--artifact {given}: no such file")
        return str(path.resolve())  # the profile names it wherever it is read from
    served = spec.artifact or ""
    if served in BUILTIN:
        return served
    places = [Path(served).expanduser()] + ([Path(model_dir) / Path(served).name] if model_dir else [])
    found = next((p for p in places if p.exists()), None) if served else None
    if found is None:
        raise ProfileError(f"{label} was measured through a server ({spec.url}): give --artifact FILE, the model "
                           "file that server ran, to time it here")  # fmt: skip
    return str(found)
