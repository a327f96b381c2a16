"""The profile directory lock: one ``edgetts profile`` at a time per directory.

:func:`hold` takes an exclusive ``fcntl.flock`` on ``DIR/.edgetts-lock`` without waiting.  The
operating system releases the lock when the holding process exits in any way (SIGKILL and
crashes included), so a lock is never left stale: a lock file whose process is gone is simply
taken again.  The holder writes its pid, host and start time into the file; a second run that
finds the lock taken reads them and fails at once with :class:`LockError` naming the holder.

The file itself is never deleted while the directory is in use: a process that had opened the
old file would otherwise lock a different inode than a later one and both would run.  Within one
process the lock is reentrant (a program holding it may run a profile into the directory),
because two ``flock`` calls on separate descriptors of one file refuse each other even in one
process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".edgetts-lock"

_held: set[Path] = set()  # resolved directories whose lock this process holds


class LockError(ValueError):
    """The directory is being written by another run."""


def holder(directory: str | Path) -> dict | None:
    """What the lock file says about its last holder (pid, host, started), or None."""
    try:
        info = json.loads((Path(directory) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


@contextmanager
def hold(directory: str | Path):
    """Hold the lock of ``directory`` (which must exist) for the ``with`` block."""
    key = Path(directory).resolve()
    if key in _held:  # held further out in this process: the outer block releases it
        yield
        return
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a named pipe or a device: no lock, and not ours to truncate
        os.close(fd)
        raise LockError(f"{key / LOCK_NAME} is not a regular file; remove it (edgetts keeps its lock there)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockError(
            f"{directory} is being written by another edgetts profile ({describe(holder(key))}); "
            "wait for it to finish, or use another --out"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held.add(key)
        yield
    finally:
        _held.discard(key)
        os.close(fd)  # releases the lock
