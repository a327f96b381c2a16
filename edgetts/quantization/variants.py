"""One quantize run as a unit: every step checked first, the output directory changed only on success.

:func:`make_variants` first prepares every step (GGUF types and their source, ONNX exports and
theirs, the importance matrix, the converter, the extras each step imports) and the output
directory; any problem is a :class:`QuantizeError` before anything is written.  Then the steps
run inside an :class:`OutputDir`: each artifact is written to a hidden temporary sibling
(``DIR/.NAME.partial``), and only when every step has succeeded are they renamed into place and
their entries added to ``manifest.json`` in one atomic write.  Intermediates (a converted
Hugging Face checkpoint, ``DIR/.NAME.scratch``) are removed either way.  On any failure (an
error, an interrupt) the temporaries are removed, and so is the output directory if this run
created it: a failed run leaves the directory exactly as it found it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgetts.quantization import QuantizeError


class OutputDir:
    """An output directory whose new files appear, with their manifest entries, only when all steps succeed."""

    def __init__(self, path: str | Path):
        from edgetts.quantization.manifest import load

        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise QuantizeError(f"{self.path}: exists and is not a directory; the output must be a directory")
        if self.path.is_dir() and not (self.path / "manifest.json").exists():
            foreign = [p.name for p in self.path.iterdir() if not _leftover(p.name)]
            if foreign:
                raise QuantizeError(f"{self.path}: holds files of its own ({', '.join(sorted(foreign)[:3])}"
                                    f"{', ...' if len(foreign) > 3 else ''}) and no manifest.json; give a new or "
                                    "empty folder, or one edgetts quantize made")  # fmt: skip
        if (self.path / "manifest.json").exists():
            load(self.path / "manifest.json")  # a broken manifest fails now, not after the work
        self._created: list[Path] = []
        self._staged: dict[str, Path] = {}  # final name -> temporary path
        self._scratch: list[Path] = []
        self._entries: list[dict] = []

    def __enter__(self) -> OutputDir:
        missing = self.path
        while not missing.exists():
            self._created.append(missing)
            missing = missing.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._remove_created()
            raise QuantizeError(f"{self.path}: cannot create the output directory ({e.strerror})") from None
        return self

    def _temp(self, name: str, suffix: str = "partial") -> Path:
        tmp = self.path / f".{name}.{suffix}"
        _remove(tmp)  # left by a run that was killed
        return tmp

    def stage(self, name: str) -> Path:
        """Where to write ``DIR/name``; it is renamed into place when the run succeeds."""
        self._staged[name] = tmp = self._temp(name)
        return tmp

    def scratch(self, name: str) -> Path:
        """A temporary path in the directory (same file system as the artifacts), removed at the end."""
        tmp = self._temp(name, "scratch")  # apart from stage(name): f16 is made from a converted f16
        self._scratch.append(tmp)
        return tmp

    def add(self, name: str, fmt: str, kind: str, source: str | Path, params: int | None = None,
            extra: dict | None = None) -> dict:  # fmt: skip
        """The manifest entry of the staged ``name``, recorded when the run succeeds."""
        from edgetts.quantization.manifest import describe

        entry = describe(self._staged[name], name, fmt, kind, source, params, extra)
        self._entries.append(entry)
        return entry

    def __exit__(self, exc_type, exc, tb) -> None:
        for tmp in self._scratch:
            _remove(tmp)
        if exc_type is None:
            self._commit()
            return
        for tmp in self._staged.values():
            _remove(tmp)
        self._remove_created()

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; only directories this run made, and only if empty
            try:
                d.rmdir()
            except FileNotFoundError:  # mkdir failed before reaching it
                continue
            except OSError:
                break

    def _commit(self) -> None:
        from edgetts.quantization.manifest import record

        for name, tmp in self._staged.items():
            final = self.path / name
            if final.is_dir() and not final.is_symlink():
                # A directory cannot be replaced by a rename: move the old one aside first.
                old = self._temp(name, "old")
                final.rename(old)
                os.replace(tmp, final)
                _remove(old)
            else:
                os.replace(tmp, final)
        if self._entries:
            record(self.path, self._entries)


def _leftover(name: str) -> bool:
    """A temporary of a run that was killed (``.NAME.partial``, ``.NAME.scratch``): removed when reused."""
    return name.startswith(".") and name.endswith((".partial", ".scratch", ".old"))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def make_variants(out: str | Path, gguf_source: str | Path, gguf_types: list[str], hf_source: str | Path,
                  onnx: list[dict], threads: int = 0, imatrix: str | None = None, converter: str | None = None,
                  log=print) -> list[dict]:  # fmt: skip
    """Make ``gguf_types`` from ``gguf_source`` and the ``onnx`` exports ({precision, execution}) from the
    Hugging Face directory ``hf_source`` into ``out``; returns the new manifest entries."""
    from edgetts.quantization import gguf_quant, onnx_export

    if not gguf_types and not onnx:
        raise QuantizeError("nothing to make: give GGUF types or ONNX exports")
    if imatrix and not gguf_types:
        raise QuantizeError("an importance matrix applies to GGUF types, and none were asked for")
    output = OutputDir(out)
    gguf = gguf_quant.prepare(gguf_source, gguf_types, threads, imatrix, converter) if gguf_types else None
    exports = [onnx_export.prepare(hf_source, o["precision"], o.get("execution", "cpu")) for o in onnx]
    with output:
        made = gguf_quant.run(gguf, output, log) if gguf else []
        for job in exports:
            made.append(onnx_export.run(job, output, log))
    return made
