"""Small file helpers shared by the profiler, quantization manifests, command outputs and model stand-ins.

:func:`write_atomic` writes through a temporary sibling and a rename, so a reader (or a process
killed mid-write) never sees half a file, and removes the temporary file when the write fails,
so a failure leaves no ``.tmp`` behind; :func:`write_json_atomic` writes JSON that way.
:func:`not_a_file` says why a path given as an input file cannot be read as one;
:func:`finite_number` whether a value read from a JSON file is a number edgetts would have written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename; ``OSError`` if it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also a KeyboardInterrupt mid-write: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: readers never see half a file."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def not_a_file(path: Path, what: str = "file") -> str:
    """Why ``path``, which is not a regular file, cannot be read as one: a directory, a FIFO or a device
    (reading it would fail, block or never end) is ``not a regular file``; else ``no such <what>``."""
    return "not a regular file" if path.exists() else f"no such {what}"


def finite_number(v: object) -> bool:
    """Whether ``v`` is a finite number: not a bool, NaN or an infinity (a file edited by hand, or written
    by another program, may hold anything where edgetts wrote a number)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
