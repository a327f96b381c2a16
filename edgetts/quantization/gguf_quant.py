"""GGUF quantization in process through llama.cpp's ``llama_model_quantize``.

Input: a GGUF in f32, f16 or bf16, or a Hugging Face directory, converted to GGUF first by
llama.cpp's ``convert_hf_to_gguf.py`` (``--converter PATH`` or ``EDGETTS_CONVERTER``); llama
architecture directories whose tokenizer is edgetts' own byte-level one (the shipped tiny
model) are converted by :mod:`edgetts.models.gguf_export` without it.  Output: one file per
type in ``out``, added to ``out/manifest.json``.

:func:`prepare` checks a request without writing anything (types known to this llama.cpp, the
source a regular GGUF file of a quantizable type or a directory this machine can convert, the
importance matrix readable); :func:`run` then does the work inside an
:class:`~edgetts.quantization.variants.OutputDir`, so a failure leaves no file behind.  A
converted Hugging Face directory is an intermediate: it is written next to the artifacts and
removed at the end.

Before quantizing, every matrix is checked against the block size of the type (256 for the
k-quants, 32 for the legacy types); tensors that do not fit are reported by name (llama.cpp
then keeps them in a fallback type).  An importance matrix in llama.cpp's GGUF imatrix format
(``<tensor>.in_sum2`` and ``<tensor>.counts``) is passed as per-column weights.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgetts.quantization import QuantizeError, importable

TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m",
         "q3_k_l", "q3_k_s", "q2_k", "f16", "bf16")  # fmt: skip
BLOCK = {t: (256 if "_k" in t else 32) for t in TYPES} | {"f16": 1, "bf16": 1}
SOURCE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}  # general.file_type values accepted as input
NEEDS_CONVERTER = (
    "{model}: needs llama.cpp's converter ({why}); pass --converter PATH/convert_hf_to_gguf.py or set "
    "EDGETTS_CONVERTER (the script is in llama.cpp's sources and in llama-cpp-python's sdist)"
)


def _ftype(lc, name: str) -> int:
    attr = f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    if not hasattr(lc, attr):
        raise QuantizeError(f"GGUF type {name!r} is not supported by this llama-cpp-python build")
    return getattr(lc, attr)


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file; a FIFO or a device would block or never end when read."""
    if not path.exists():
        raise QuantizeError(f"{path}: no such {what}")
    if not path.is_file():
        raise QuantizeError(f"{path}: not a regular file (a directory, FIFO or device cannot be the {what})")
    return path


def inspect(path: Path) -> tuple[str, int, list[tuple[str, int]]]:
    """(file type, parameter count, [(matrix name, row length)]) of a GGUF file."""
    from gguf import GGUFReader

    path = regular_file(Path(path), "GGUF file")
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct.error, ... on foreign files
        raise QuantizeError(f"{path}: not a readable GGUF file ({e})") from None
    f = r.fields.get("general.file_type")
    ftype = int(f.parts[f.data[0]][0]) if f else 0
    params = sum(int(t.n_elements) for t in r.tensors)
    mats = [(t.name, int(t.shape[0])) for t in r.tensors if len(t.shape) >= 2]
    return SOURCE_TYPES.get(ftype) or ftype_name(ftype), params, mats


def ftype_name(ftype: int) -> str:
    """llama.cpp's name of a ``general.file_type`` value (15: ``q4_k_m``), or ``type N`` if unknown."""
    import llama_cpp as lc

    prefix = "LLAMA_FTYPE_MOSTLY_"
    names = {getattr(lc, n): n[len(prefix):].lower() for n in dir(lc) if n.startswith(prefix)}
    return names.get(ftype, f"type {ftype}")


def _source(path: Path) -> tuple[int, list[tuple[str, int]]]:
    """(parameter count, matrices) of a GGUF that can be quantized."""
    ftype, params, mats = inspect(path)
    if ftype not in SOURCE_TYPES.values():
        raise QuantizeError(f"{path}: is already {ftype}; quantize from an f32, f16 or bf16 GGUF")
    return params, mats


def misfits(mats: list[tuple[str, int]], kind: str) -> list[str]:
    return [name for name, row in mats if row % BLOCK[kind]]


def _converter(model: Path, converter: str | None) -> str | None:
    """The converter script for a Hugging Face directory, or None when edgetts' own exporter will do."""
    converter = converter or os.environ.get("EDGETTS_CONVERTER")
    if converter:
        regular_file(Path(converter), "converter script (convert_hf_to_gguf.py)")
        return converter
    if not importable("safetensors.numpy"):
        raise QuantizeError(NEEDS_CONVERTER.format(model=model, why="safetensors is not installed"))
    return None


def convert(model: Path, target: Path, converter: str | None) -> None:
    """Write the Hugging Face directory ``model`` as an f16 GGUF at ``target``."""
    if converter:
        cmd = [sys.executable, converter, str(model), "--outfile", str(target), "--outtype", "f16"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not target.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise QuantizeError(f"{converter} failed: {tail[0]}")
        return
    from edgetts.models.gguf_export import export_gguf

    try:
        export_gguf(model, target)
    except (ValueError, KeyError, OSError, ImportError) as e:  # what a directory it cannot convert raises
        raise QuantizeError(NEEDS_CONVERTER.format(model=model, why=e)) from None


def load_imatrix(path: Path):
    """A NULL-terminated ``llama_model_imatrix_data`` array from a GGUF imatrix file (kept alive by the caller)."""
    import llama_cpp as lc
    import numpy as np
    from gguf import GGUFReader

    path = regular_file(Path(path), "imatrix file")
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # as in inspect()
        raise QuantizeError(f"{path}: not a GGUF imatrix file ({e})") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
    keep, entries = [], []
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise QuantizeError(f"{path}: {base}.in_sum2 has no {base}.counts")
        n_mat = max(1, counts.size)
        if sums.size % n_mat:
            raise QuantizeError(f"{path}: {base}.in_sum2 does not split into {n_mat} matrices")
        vals = (sums.reshape(n_mat, -1) / np.maximum(counts.reshape(n_mat, 1), 1)).astype(np.float32).ravel()
        keep.append(vals)
        entries.append((base.encode(), vals))
    if not entries:
        raise QuantizeError(f"{path}: no '<tensor>.in_sum2' entries")
    arr = (lc.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, vals) in enumerate(entries):
        arr[i].name = name
        arr[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = vals.size
    arr[len(entries)].name = None
    return arr, keep


@dataclass
class GGUFJob:
    """A checked GGUF request; ``params`` and ``mats`` are known up front for GGUF input, after conversion otherwise."""

    model: Path  # as given; recorded as every artifact's source
    types: list[str]
    stem: str  # artifacts are named STEM-TYPE.gguf
    threads: int = 0
    hf: bool = False
    converter: str | None = None
    imatrix: Path | None = None
    imat: tuple | None = None  # load_imatrix()'s array and the buffers it points into
    params: int = 0
    mats: list[tuple[str, int]] = field(default_factory=list)


def prepare(model: str | Path, types: list[str], threads: int = 0, imatrix: str | None = None,
            converter: str | None = None) -> GGUFJob:  # fmt: skip
    """Check a request to quantize ``model`` to ``types`` without writing anything."""
    import llama_cpp as lc

    model, types = Path(model), list(dict.fromkeys(types))
    bad = [str(t) for t in types if t not in TYPES]
    if bad or not types:
        raise QuantizeError(f"unknown GGUF type(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TYPES)}")
    for kind in types:
        _ftype(lc, kind)
    if model.is_file():
        stem = model.stem.removesuffix("-f16").removesuffix("-f32").removesuffix("-bf16")
        job = GGUFJob(model, types, stem, threads)
        job.params, job.mats = _source(model)
    elif model.is_dir() and (model / "config.json").is_file():
        job = GGUFJob(model, types, model.resolve().name, threads, hf=True, converter=_converter(model, converter))
    elif not model.exists():
        raise QuantizeError(f"{model}: no such file or directory")
    else:
        raise QuantizeError(f"{model}: neither a GGUF file nor a Hugging Face directory (no config.json)")
    if imatrix:
        job.imatrix = Path(imatrix)
        job.imat = load_imatrix(job.imatrix)
    return job


def run(job: GGUFJob, out, log=print) -> list[dict]:
    """Do a prepared request into ``out`` (an entered OutputDir); returns the manifest entries."""
    import llama_cpp as lc

    from edgetts.engines.llamacpp import _set_log

    tensors = Tensors(log)
    _set_log(lc, verbose=False, watch=tensors.see)  # llama.cpp prints every tensor otherwise; we count them
    src, params, mats = job.model, job.params, job.mats
    if job.hf:
        src = out.scratch(f"{job.stem}-f16.gguf")
        convert(job.model, src, job.converter)
        params, mats = _source(src)
    entries = []
    for kind in job.types:
        for name in misfits(mats, kind):
            log(f"{kind}: tensor {name} has rows not divisible by {BLOCK[kind]}; llama.cpp keeps it in a fallback type")
        name = f"{job.stem}-{kind}.gguf"
        dst = out.stage(name)
        qp = lc.llama_model_quantize_default_params()
        qp.ftype = _ftype(lc, kind)
        qp.nthread = job.threads
        if job.imat is not None:
            qp.imatrix = ctypes.cast(job.imat[0], type(qp.imatrix))
        log(f"quantizing {job.model.name if not job.hf else job.stem} to {kind} ({params / 1e6:.0f}M parameters)")
        tensors.start(kind)
        args = (str(src).encode(), str(dst).encode(), ctypes.byref(qp))
        status = interruptible(lambda args=args: lc.llama_model_quantize(*args))
        if status != 0 or not dst.is_file():
            raise QuantizeError(f"llama.cpp could not quantize {job.model} to {kind} (status {status})")
        entries.append(out.add(name, "gguf", kind, job.model, params,
                               {"imatrix": str(job.imatrix) if job.imatrix else None}))  # fmt: skip
        log(f"made {name} ({dst.stat().st_size / 2**20:.2f} MiB, {entries[-1]['bits_per_weight']} bits/weight)")
    return entries


def interruptible(call):
    """``call()`` in a worker thread, the main thread waiting in short joins.

    A native call of a minute blocks the main thread, and Python runs a signal handler only
    between bytecodes of that thread: Ctrl-C would be noticed in llama.cpp's log callback, where a
    KeyboardInterrupt is printed and dropped, and the run would go on.  Waiting here, the main
    thread gets the KeyboardInterrupt at once and unwinds (the output directory removes what was
    staged); the worker is a daemon, left to the process's exit.
    """
    box: dict = {}

    def work():
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    worker = threading.Thread(target=work, name="edgetts-quantize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


class Tensors:
    """Progress of one quantization from llama.cpp's per-tensor info lines (``[ 12/ 311] name ...``):
    a line every 10% with the time left, through ``log``."""

    LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")

    def __init__(self, log):
        self.log, self.kind, self.t0, self.shown = log, "", 0.0, -1

    def start(self, kind: str) -> None:
        self.kind, self.t0, self.shown = kind, time.monotonic(), -1

    def see(self, text: str) -> None:
        m = self.LINE.search(text)
        if not m:
            return
        done, total = int(m.group(1)), max(1, int(m.group(2)))
        tenth = 10 * done // total
        if tenth <= self.shown or done == total:
            return
        self.shown = tenth
        spent = time.monotonic() - self.t0
        left = spent * (total - done) / max(done, 1)
        self.log(f"{self.kind}: {done}/{total} tensors ({100 * done // total}%), about {left:.0f} s left")


def quantize(model: str | Path, out: str | Path, types: list[str], threads: int = 0, imatrix: str | None = None,
             converter: str | None = None, log=print) -> list[dict]:  # fmt: skip
    """Quantize ``model`` to each of ``types`` into ``out``; returns the manifest entries."""
    from edgetts.quantization.variants import make_variants

    return make_variants(out, model, types, model, [], threads, imatrix, converter, log)
