"""Hugging Face directory to ONNX (int4, int8 or fp16; cpu or cuda) through onnxruntime-genai's builder.

The builder runs as a subprocess (``python -m onnxruntime_genai.models.builder``) because it
imports torch and transformers and holds the whole model in memory; its output directory
(``model.onnx`` + weights + ``genai_config.json`` + tokenizer files) runs on the
``onnx-genai`` engine and is added to the manifest as one directory artifact.
:func:`prepare` checks a request (precision, execution provider, a Hugging Face directory, the
builder's packages) without running anything; :func:`run` builds into a temporary directory
of an :class:`~edgetts.quantization.variants.OutputDir`, renamed into place when the whole
quantize run succeeds.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgetts.quantization import QuantizeError, importable

PRECISIONS = ("int4", "int8", "fp16", "fp32")
EXECUTION = ("cpu", "cuda")
BUILDER_MODULES = (("onnxruntime_genai", "onnx-build"), ("torch", "train"), ("onnx_ir", "onnx-build"))


@dataclass
class OnnxJob:
    model: Path
    precision: str
    execution: str

    @property
    def name(self) -> str:
        return f"{self.model.resolve().name}-onnx-{self.precision}-{self.execution}"


def parse_spec(text: str) -> dict:
    """``PRECISION[:EXECUTION]`` (execution defaults to cpu) as {precision, execution}."""
    parts = text.strip().split(":")
    if len(parts) > 2:
        raise QuantizeError(f"ONNX export {text.strip()!r}: expected PRECISION[:EXECUTION], e.g. int4:cuda")
    return {"precision": parts[0], "execution": parts[1] if len(parts) == 2 else "cpu"}


def prepare(model: str | Path, precision: str = "int4", execution: str = "cpu") -> OnnxJob:
    """Check an export request without running anything."""
    model = Path(model)
    if precision not in PRECISIONS:
        raise QuantizeError(f"unknown ONNX precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if execution not in EXECUTION:
        raise QuantizeError(f"unknown execution provider {execution!r}; choose from {', '.join(EXECUTION)}")
    if not (model.is_dir() and (model / "config.json").is_file()):
        raise QuantizeError(f"{model}: the ONNX builder needs a Hugging Face directory (config.json, weights)")
    for mod, extra in BUILDER_MODULES:
        if not importable(mod):
            raise QuantizeError(f"the ONNX builder needs {mod}: pip install 'edgetts[{extra}]'")
    return OnnxJob(model, precision, execution)


def run(job: OnnxJob, out, log=print) -> dict:
    """Build a prepared export into ``out`` (an entered OutputDir); returns its manifest entry."""
    dst = out.stage(job.name)
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(job.model), "-i", str(job.model),
               "-o", str(dst), "-p", job.precision, "-e", job.execution, "-c", cache]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (dst / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QuantizeError(f"onnxruntime-genai's builder failed: {tail[0]}")
    entry = out.add(job.name, "onnx", f"{job.precision}-{job.execution}", job.model)
    log(f"made {job.name} ({entry['bytes'] / 2**20:.2f} MiB)")
    return entry


def export_onnx(model: str | Path, out: str | Path, precision: str = "int4", execution: str = "cpu", log=print) -> dict:
    from edgetts.quantization.variants import make_variants

    spec = {"precision": precision, "execution": execution}
    return make_variants(out, model, [], model, [spec], log=log)[0]
