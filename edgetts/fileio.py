"""Small file helpers shared by the profiler, quantization manifests and model stand-ins.

:func:`write_json_atomic` writes through a temporary sibling and a rename, so a reader (or a
process killed mid-write) never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
