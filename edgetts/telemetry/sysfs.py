"""Every sysfs (and device-file) path the project reads, under one movable root.

``EDGETTS_SYSFS_ROOT`` (default ``/``) is prepended to each absolute path, read afresh at every
call, so a test (or a user with a captured tree from a device) can put a fake Jetson, RAPL or
GPU layout in a temporary folder and point the whole program at it.  ``/proc`` of this process
(resident memory, MemAvailable) is not moved: it describes the machine the process runs on.
"""

from __future__ import annotations

import os
import stat


def root() -> str:
    return os.environ.get("EDGETTS_SYSFS_ROOT", "").strip() or "/"


def path(p: str) -> str:
    """``p`` (absolute, such as ``/sys/class/hwmon``) under the root."""
    r = root()
    return p if r == "/" else os.path.join(r, p.lstrip("/"))


MAX_BYTES = 65536  # a sysfs attribute holds at most a page; a release file a line or two


def read_text(p: str) -> str | None:
    """The stripped contents of ``p`` (already under the root), or None when it cannot be read.  Only a
    regular file is read (sysfs attributes are), and only its first ``MAX_BYTES``: a named pipe in a
    tree under ``EDGETTS_SYSFS_ROOT`` would block the meter's thread, a device never end."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_BYTES).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def read_int(p: str) -> int | None:
    """The integer in ``p`` (already under the root), or None when missing, unreadable or not a number
    (a sensor that is switched off answers ENODATA)."""
    text = read_text(p)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
