"""Output files of the commands: checked before any work, written whole or not at all.

:func:`check_output` refuses, with one line, an output path that cannot be a file (a
directory, or a path under an existing file), a parent that does not exist when the command
does not create parents, an existing path that is not a regular file (a named pipe, which
reading would block on, or a device such as ``/dev/null``, which the rename would replace), and
an existing file that edgetts did not write (``ours`` decides,
from the file's content), so a command never overwrites a user's file.  :func:`write_text`
writes through a temporary sibling and a rename, and removes the temporary file if anything
fails, so a failed command leaves neither a partial file nor a ``.tmp`` behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgetts.fileio import write_atomic


class OutputError(ValueError):
    """An output path a command cannot or must not write; the message is one line."""


def check_output(path: str | Path, ours: Callable[[Path], bool] | None = None, make_parents: bool = True) -> Path:
    """``path`` as a :class:`Path`, once it is known to be writable as a file edgetts may replace."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    for parent in path.parents:  # the nearest existing folder decides
        if parent.exists():  # always reached: "." or the root exists
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is a file, not a directory")
            if parent != path.parent and not make_parents:
                raise OutputError(f"cannot write {path}: no directory {path.parent}")
            break
    if path.exists() and not path.is_file():  # a FIFO would block the check below; a device the rename replaces
        raise OutputError(f"{path} exists and is not a regular file; give a file name")
    if path.exists() and ours is not None and not ours(path):
        raise OutputError(f"{path} exists and was not written by edgetts; remove it or choose another output")
    return path


def write_text(path: str | Path, text: str, make_parents: bool = True) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def starts_with(marker: str) -> Callable[[Path], bool]:
    """An ``ours`` test: the file begins with ``marker`` (what edgetts writes first)."""

    def ours(path: Path) -> bool:
        try:
            with path.open("rb") as f:
                return f.read(len(marker.encode())) == marker.encode()
        except OSError:
            return False

    return ours


def contains(marker: str, within: int) -> Callable[[Path], bool]:
    """An ``ours`` test: ``marker`` occurs in the file's first ``within`` bytes (a header edgetts writes)."""

    def ours(path: Path) -> bool:
        try:
            with path.open("rb") as f:
                return marker.encode() in f.read(within)
        except OSError:
            return False

    return ours
