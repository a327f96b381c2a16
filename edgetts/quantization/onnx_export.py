"""Hugging Face directory to ONNX (int4, int8 or fp16; cpu or cuda) through onnxruntime-genai's builder.

The builder runs as a subprocess (``python -m onnxruntime_genai.models.builder``) because it
imports torch and transformers and holds the whole model in memory; its output directory
(``model.onnx`` + weights + ``genai_config.json`` + tokenizer files) runs on the
``onnx-genai`` engine and is added to the manifest as one directory artifact.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgetts.quantization import QuantizeError

PRECISIONS = ("int4", "int8", "fp16", "fp32")
EXECUTION = ("cpu", "cuda")


def export_onnx(model: str | Path, out: str | Path, precision: str = "int4", execution: str = "cpu", log=print) -> dict:
    from edgetts.quantization.manifest import add_artifact

    model, out = Path(model), Path(out)
    if precision not in PRECISIONS:
        raise QuantizeError(f"unknown ONNX precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if execution not in EXECUTION:
        raise QuantizeError(f"unknown execution provider {execution!r}; choose from {', '.join(EXECUTION)}")
    if not (model / "config.json").is_file():
        raise QuantizeError(f"{model}: the ONNX builder needs a Hugging Face directory (config.json, weights)")
    for mod, extra in (("onnxruntime_genai", "onnx-build"), ("torch", "train"), ("onnx_ir", "onnx-build")):
        if importlib.util.find_spec(mod) is None:
            raise QuantizeError(f"the ONNX builder needs {mod}: pip install 'edgetts[{extra}]'")
    dst = out / f"{model.name}-onnx-{precision}-{execution}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model), "-i", str(model),
               "-o", str(dst), "-p", precision, "-e", execution, "-c", cache]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (dst / "genai_config.json").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QuantizeError(f"onnxruntime-genai's builder failed: {tail[0]}")
    entry = add_artifact(out, dst, "onnx", f"{precision}-{execution}", model)
    log(f"wrote {dst} ({entry['bytes'] / 2**20:.2f} MiB)")
    return entry
