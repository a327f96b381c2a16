"""``DIR/manifest.json``: what a quantize run produced, so profiles can use variants by reference.

Shape::

    {"schema": "edgetts.manifest/v1",
     "artifacts": [{"path": "tiny-q4_k_m.gguf", "format": "gguf", "type": "q4_k_m", "bytes": ...,
                    "bits_per_weight": 4.9, "sha256": "...", "source": {"path": ..., "sha256": ...},
                    "tools": {"edgetts": "0.1.0", "llama-cpp-python": "0.3.36"}, "created": "..."}]}

``path`` is relative to the manifest's directory.  Adding an artifact replaces an entry with
the same path, so rerunning a quantization keeps one entry per file.  :func:`artifacts`
resolves paths and, with ``verify=True``, checks every file's sha256 (a changed or missing
file is a one-line error naming it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from importlib import metadata
from pathlib import Path

from edgetts.profiling.records import write_json_atomic
from edgetts.quantization import QuantizeError

SCHEMA = "edgetts.manifest/v1"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict:
    out = {}
    for dist in ("edgetts", "llama-cpp-python", "onnxruntime-genai", "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def add_artifact(directory: str | Path, path: str | Path, fmt: str, kind: str, source: str | Path,
                 params: int | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    directory, path = Path(directory), Path(path)
    mpath = directory / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {"schema": SCHEMA, "artifacts": []}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    digest = sha256(path) if path.is_file() else _dir_digest(path)
    src = Path(source)
    entry = {
        "path": str(path.relative_to(directory)), "format": fmt, "type": kind, "bytes": size,
        "bits_per_weight": round(8 * size / params, 3) if params else None, "sha256": digest,
        "source": {"path": str(src), "sha256": sha256(src) if src.is_file() else _dir_digest(src)},
        "tools": tool_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }  # fmt: skip
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["path"] != entry["path"]] + [entry]
    write_json_atomic(mpath, manifest)
    return entry


def _dir_digest(d: Path) -> str:
    """sha256 over (relative path, file sha256) of every file of a directory artifact, sorted."""
    h = hashlib.sha256()
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        h.update(f"{p.relative_to(d)}\0{sha256(p)}\n".encode())
    return h.hexdigest()


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QuantizeError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("schema") != SCHEMA or not isinstance(manifest.get("artifacts"), list):
        raise QuantizeError(f"{path}: not an {SCHEMA} manifest")
    return manifest


def artifacts(path: str | Path, fmt: str | None = "gguf", verify: bool = True) -> list[Path]:
    """Paths of a manifest's artifacts (of ``fmt``), hash-checked when ``verify``."""
    path = Path(path)
    out = []
    for a in load(path)["artifacts"]:
        if fmt and a["format"] != fmt:
            continue
        p = path.parent / a["path"]
        if not p.exists():
            raise QuantizeError(f"{path}: artifact {a['path']} is missing")
        if verify and (sha256(p) if p.is_file() else _dir_digest(p)) != a["sha256"]:
            raise QuantizeError(f"{path}: artifact {a['path']} does not match its sha256")
        out.append(p)
    if not out:
        raise QuantizeError(f"{path}: no {fmt or ''} artifacts".replace("  ", " "))
    return out
