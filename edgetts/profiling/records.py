"""``records.jsonl``: the append-only, crash-safe log of measured queries.

Each record is one JSON object on one line, written with a single ``write`` and then
``flush`` + ``fsync``, so after a crash (even SIGKILL or power loss) the file holds every
record that was reported written.  A process killed in the middle of a write can leave at
most one partial last line; :meth:`RecordLog.load` cuts it off (that record was never
reported done and will be measured again).  A malformed line anywhere else means the file
was damaged by something else, and loading refuses rather than guessing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgetts.fileio import write_json_atomic  # noqa: F401 - kept importable from here


class RecordsError(ValueError):
    pass


class RecordLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        """All complete records by key, after cutting a partial last line if there is one."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a write cut short by a kill: drop the partial line on disk too
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        records: dict[str, dict] = {}
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RecordsError(f"{self.path}:{n}: damaged record (not a JSON object with a 'key')") from None
            if key in records:
                raise RecordsError(f"{self.path}:{n}: duplicate record {key!r}")
            records[key] = rec
        return records

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
