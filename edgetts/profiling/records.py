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
import math
import os
from pathlib import Path

from edgetts.profiling.summary import damage

# Deleting a line loses nothing that cannot be measured again: a resumed run measures every missing key.
REPAIR = "delete the line(s) named and run the same command again (a query left without a record is measured again)"


class RecordsError(ValueError):
    pass


class NotFinite(ValueError):
    """A record's number is NaN or infinite: edgetts never writes one (a summary would carry it into the
    Pareto config), so the line was written by something else."""


def _not_finite(name: str):
    raise NotFinite(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise NotFinite(text)
    return value


class RecordLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self, repair: bool = True) -> dict[str, dict]:
        """All complete records by key, after cutting a partial last line if there is one: on disk too
        with ``repair`` (the profile's own run, under its lock, about to append), in memory only
        without (another command reading the directory: calibrate's source, merge's shards, where
        the partial line may be a running profile's write in progress)."""
        if not self.path.exists():
            return {}
        if not self.path.is_file():  # a named pipe would block the read below
            raise RecordsError(f"{self.path} is not a regular file; remove it (or use another directory)")
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and repair:  # a write cut short by a kill: drop the partial line on disk too
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        data = data[:end]
        records: dict[str, dict] = {}
        bad: list[tuple[int, str]] = []  # (line number, what is wrong): all reported at once
        for n, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                # bytes: invalid UTF-8 is a ValueError like bad JSON
                rec = json.loads(line, parse_constant=_not_finite, parse_float=_finite)
                key = rec["key"]
                if not isinstance(key, str):
                    raise TypeError
            except NotFinite:
                bad.append((n, "damaged record (a number that is not finite: NaN, Infinity or beyond a double)"))
                continue
            except (ValueError, KeyError, TypeError, RecursionError):
                bad.append((n, "damaged record (not a JSON object with a 'key')"))
                continue
            if key in records:
                bad.append((n, f"duplicate record {key!r}"))
                continue
            wrong = damage(rec)
            if wrong:
                bad.append((n, f"damaged record {key!r} ({wrong})"))
                continue
            records[key] = rec
        if bad:
            n, why = bad[0]
            more = ""
            if len(bad) > 1:
                lines = ", ".join(str(b[0]) for b in bad[1:4]) + (", ..." if len(bad) > 4 else "")
                more = f" (and {len(bad) - 1} more such lines: {lines})"
            raise RecordsError(f"{self.path}:{n}: {why}{more}; {REPAIR}")
        return records

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
