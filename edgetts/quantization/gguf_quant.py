"""GGUF quantization in process through llama.cpp's ``llama_model_quantize``.

Input: a GGUF in f32, f16 or bf16, or a Hugging Face directory, converted to GGUF first by
llama.cpp's ``convert_hf_to_gguf.py`` (``--converter PATH`` or ``EDGETTS_CONVERTER``); llama
architecture directories whose tokenizer is edgetts' own byte-level one (the shipped tiny
model) are converted by :mod:`edgetts.models.gguf_export` without it.  Output: one file per
type in ``out``, added to ``out/manifest.json``.

Before quantizing, every matrix is checked against the block size of the type (256 for the
k-quants, 32 for the legacy types); tensors that do not fit are reported by name (llama.cpp
then keeps them in a fallback type).  An importance matrix in llama.cpp's GGUF imatrix format
(``<tensor>.in_sum2`` and ``<tensor>.counts``) is passed as per-column weights.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from edgetts.quantization import QuantizeError

TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m",
         "q3_k_l", "q3_k_s", "q2_k", "f16", "bf16")  # fmt: skip
BLOCK = {t: (256 if "_k" in t else 32) for t in TYPES} | {"f16": 1, "bf16": 1}
SOURCE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}  # general.file_type values accepted as input


def _ftype(lc, name: str) -> int:
    attr = f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    if not hasattr(lc, attr):
        raise QuantizeError(f"unknown GGUF type {name!r}; choose from {', '.join(TYPES)}")
    return getattr(lc, attr)


def inspect(path: Path) -> tuple[str, int, list[tuple[str, int]]]:
    """(file type, parameter count, [(matrix name, row length)]) of a GGUF file."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct.error, ... on foreign files
        raise QuantizeError(f"{path}: not a readable GGUF file ({e})") from None
    f = r.fields.get("general.file_type")
    ftype = int(f.parts[f.data[0]][0]) if f else 0
    params = sum(int(t.n_elements) for t in r.tensors)
    mats = [(t.name, int(t.shape[0])) for t in r.tensors if len(t.shape) >= 2]
    return SOURCE_TYPES.get(ftype, f"type {ftype}"), params, mats


def misfits(mats: list[tuple[str, int]], kind: str) -> list[str]:
    return [name for name, row in mats if row % BLOCK[kind]]


def to_gguf(model: Path, out: Path, converter: str | None) -> Path:
    """A GGUF for ``model``: itself, or converted from a Hugging Face directory."""
    if model.is_file():
        return model
    if not (model / "config.json").is_file():
        raise QuantizeError(f"{model}: neither a GGUF file nor a Hugging Face directory (no config.json)")
    target = out / f"{model.name}-f16.gguf"
    converter = converter or os.environ.get("EDGETTS_CONVERTER")
    if converter:
        cmd = [sys.executable, converter, str(model), "--outfile", str(target), "--outtype", "f16"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise QuantizeError(f"{converter} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        return target
    from edgetts.models.gguf_export import export_gguf

    try:
        return export_gguf(model, target)
    except (ValueError, KeyError) as e:
        raise QuantizeError(
            f"{model}: needs llama.cpp's converter ({e}); pass --converter PATH/convert_hf_to_gguf.py or set "
            "EDGETTS_CONVERTER (the script is in llama.cpp's sources and in llama-cpp-python's sdist)"
        ) from None


def load_imatrix(path: Path):
    """A NULL-terminated ``llama_model_imatrix_data`` array from a GGUF imatrix file (kept alive by the caller)."""
    import llama_cpp as lc
    import numpy as np
    from gguf import GGUFReader

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


def quantize(model: str | Path, out: str | Path, types: list[str], threads: int = 0, imatrix: str | None = None,
             converter: str | None = None, log=print) -> list[dict]:  # fmt: skip
    """Quantize ``model`` to each of ``types`` into ``out``; returns the manifest entries."""
    import llama_cpp as lc

    from edgetts.engines.llamacpp import _set_log
    from edgetts.quantization.manifest import add_artifact

    _set_log(lc, verbose=False)  # llama.cpp prints every tensor otherwise

    model, out = Path(model), Path(out)
    if not model.exists():
        raise QuantizeError(f"{model}: no such file or directory")
    bad = [t for t in types if t not in TYPES]
    if bad or not types:
        raise QuantizeError(f"unknown GGUF type(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TYPES)}")
    out.mkdir(parents=True, exist_ok=True)
    src = to_gguf(model, out, converter)
    ftype, params, mats = inspect(src)
    if ftype not in SOURCE_TYPES.values():
        raise QuantizeError(f"{src}: is {ftype}; quantize from an f32, f16 or bf16 GGUF")
    imat = load_imatrix(Path(imatrix)) if imatrix else None
    entries = []
    for kind in types:
        for name in misfits(mats, kind):
            log(f"{kind}: tensor {name} has rows not divisible by {BLOCK[kind]}; llama.cpp keeps it in a fallback type")
        dst = out / f"{src.stem.removesuffix('-f16').removesuffix('-f32').removesuffix('-bf16')}-{kind}.gguf"
        qp = lc.llama_model_quantize_default_params()
        qp.ftype = _ftype(lc, kind)
        qp.nthread = threads
        if imat is not None:
            qp.imatrix = ctypes.cast(imat[0], type(qp.imatrix))
        status = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(qp))
        if status != 0 or not dst.exists():
            raise QuantizeError(f"llama.cpp could not quantize {src} to {kind} (status {status})")
        entries.append(add_artifact(out, dst, "gguf", kind, model, params,
                                    {"imatrix": str(imatrix) if imatrix else None}))  # fmt: skip
        log(f"wrote {dst} ({dst.stat().st_size / 2**20:.2f} MiB, {entries[-1]['bits_per_weight']} bits/weight)")
    return entries
