"""Quantization recipes: which variants to make for a target device (``quantize/<target>.yaml``).

A recipe lists GGUF types (``gguf: [q8_0, q4_k_m]``) and ONNX exports
(``onnx: [{precision: int4, execution: cuda}]``); the comments in each shipped recipe say why
those fit the device's memory and bandwidth.
"""

from __future__ import annotations

from pathlib import Path

from edgetts.quantization import QuantizeError
from edgetts.quantization.gguf_quant import TYPES
from edgetts.quantization.onnx_export import EXECUTION, PRECISIONS


def load_recipe(path: str | Path) -> dict:
    from edgetts.yamlfile import load_mapping

    data = load_mapping(path, {"target", "gguf", "onnx"}, QuantizeError, "recipe")
    path = Path(path)
    gguf, onnx = data.get("gguf") or [], data.get("onnx") or []
    for key, value in (("gguf", gguf), ("onnx", onnx)):
        if not isinstance(value, list):
            raise QuantizeError(f"{path}: {key}: expected a list")
    bad = [t for t in gguf if t not in TYPES]
    if bad:
        raise QuantizeError(f"{path}: gguf: unknown type(s) {', '.join(map(str, bad))}")
    for i, o in enumerate(onnx):
        if (
            not isinstance(o, dict)
            or o.get("precision") not in PRECISIONS
            or o.get("execution", "cpu") not in EXECUTION
        ):
            raise QuantizeError(
                f"{path}: onnx[{i}]: expected {{precision: {'|'.join(PRECISIONS)}, execution: cpu|cuda}}"
            )
    return {"target": data.get("target", path.stem), "gguf": gguf, "onnx": onnx}
