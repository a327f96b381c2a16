"""``DIR/manifest.json``: what a quantize run produced, so profiles can use variants by reference.

Shape::

    {"schema": "edgetts.manifest/v1",
     "artifacts": [{"path": "tiny-q4_k_m.gguf", "format": "gguf", "type": "q4_k_m", "bytes": ...,
                    "bits_per_weight": 4.9, "sha256": "...", "source": {"path": ..., "sha256": ...},
                    "tools": {"edgetts": "0.1.0", "llama-cpp-python": "0.3.36"}, "created": "..."}]}

``path`` is relative to the manifest's directory and must stay inside it (no absolute paths,
no ``..`` out of it), so a directory of variants can be moved or copied as a whole.
:func:`describe` makes an entry and :func:`record` merges entries into the file; an entry
replaces one with the same path, so rerunning a quantization keeps one entry per file.
:func:`load` refuses a file that does not have this shape with a one-line error, and
:func:`entries` resolves every artifact's path and, with ``verify=True``, checks its sha256
(a changed or missing file is a one-line error naming it).  ``format`` (``gguf``, ``onnx``,
``tensorrt``) says which engine runs the artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path

from edgetts.fileio import not_a_file, write_json_atomic
from edgetts.quantization import QuantizeError

SCHEMA = "edgetts.manifest/v1"
REQUIRED = ("path", "format", "sha256")  # what readers of a manifest rely on in every entry


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(path: Path) -> str:
    """sha256 of a file, or of a directory artifact as :func:`_dir_digest` defines it."""
    return sha256(path) if path.is_file() else _dir_digest(path)


def _dir_digest(d: Path) -> str:
    """sha256 over (relative path, file sha256) of every file of a directory artifact, sorted."""
    h = hashlib.sha256()
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        h.update(f"{p.relative_to(d)}\0{sha256(p)}\n".encode())
    return h.hexdigest()


def tool_versions() -> dict:
    out = {}
    for dist in ("edgetts", "llama-cpp-python", "onnxruntime-genai", "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def describe(path: str | Path, name: str, fmt: str, kind: str, source: str | Path, params: int | None = None,
             extra: dict | None = None) -> dict:  # fmt: skip
    """The manifest entry of the file or directory at ``path``, to be stored as ``name``.

    ``path`` and ``name`` differ while an artifact is still being written under a temporary name.
    """
    path, src = Path(path), Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    return {
        "path": name, "format": fmt, "type": kind, "bytes": size,
        "bits_per_weight": round(8 * size / params, 3) if params else None, "sha256": digest(path),
        "source": {"path": str(src), "sha256": digest(src)},
        "tools": tool_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }  # fmt: skip


def record(directory: str | Path, new: list[dict]) -> None:
    """Merge ``new`` entries into ``directory/manifest.json`` (created if absent), in one atomic write."""
    mpath = Path(directory) / "manifest.json"
    manifest = load(mpath) if mpath.exists() else {"schema": SCHEMA, "artifacts": []}
    names = {e["path"] for e in new}
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["path"] not in names] + new
    write_json_atomic(mpath, manifest)


def add_artifact(directory: str | Path, path: str | Path, fmt: str, kind: str, source: str | Path,
                 params: int | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    """Describe ``path`` (inside ``directory``) and record it in the directory's manifest."""
    directory, path = Path(directory), Path(path)
    entry = describe(path, path.relative_to(directory).as_posix(), fmt, kind, source, params, extra)
    record(directory, [entry])
    return entry


def load(path: str | Path) -> dict:
    """The manifest at ``path``, its shape checked (artifact files are not looked at)."""
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"{path}: {not_a_file(path, 'manifest file')}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise QuantizeError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise QuantizeError(f"{path}: not an {SCHEMA} manifest")
    if not isinstance(manifest.get("artifacts"), list):
        raise QuantizeError(f"{path}: 'artifacts' must be a list")
    for i, a in enumerate(manifest["artifacts"]):
        problem = _entry_problem(a)
        if problem:
            raise QuantizeError(f"{path}: artifacts[{i}]: {problem}")
    return manifest


def _entry_problem(a) -> str | None:
    if not isinstance(a, dict):
        return f"expected an object, got {json.dumps(a)}"
    missing = [k for k in REQUIRED if not isinstance(a.get(k), str) or not a[k]]
    if missing:
        return f"missing {', '.join(missing)}"
    rel = a["path"]
    # A manifest names files next to it; one reaching elsewhere would hash and load whatever is there.
    if Path(rel).is_absolute() or os.path.normpath(rel).split(os.sep)[0] in ("..", "."):
        return f"path {rel!r} is not inside the manifest's directory"
    return None


def entries(path: str | Path, fmt: str | None = None, verify: bool = True) -> list[tuple[Path, dict]]:
    """(artifact path, manifest entry) for every artifact (of ``fmt``), hash-checked when ``verify``.

    A manifest with no such artifact is an error: whoever asks for its artifacts needs at least one.
    """
    path = Path(path)
    out = []
    for a in load(path)["artifacts"]:
        if fmt and a["format"] != fmt:
            continue
        p = path.parent / a["path"]
        if not p.exists():
            raise QuantizeError(f"{path}: artifact {a['path']} is missing")
        if not (p.is_file() or p.is_dir()):
            raise QuantizeError(f"{path}: artifact {a['path']} is not a file or directory")
        if verify and digest(p) != a["sha256"]:
            raise QuantizeError(f"{path}: artifact {a['path']} does not match its sha256")
        out.append((p, a))
    if not out:
        raise QuantizeError(f"{path}: no {fmt + ' ' if fmt else ''}artifacts")
    return out


def artifacts(path: str | Path, fmt: str | None = "gguf", verify: bool = True) -> list[Path]:
    """Paths of a manifest's artifacts (of ``fmt``), hash-checked when ``verify``."""
    return [p for p, _ in entries(path, fmt, verify)]
