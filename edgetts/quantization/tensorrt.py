"""``edgetts compile``: a TensorRT engine from an ONNX model, built on the target GPU.

TensorRT engines are specific to the GPU (and driver and TensorRT version) they are built on,
so this refuses to run without a CUDA GPU: the engine must be built on the device that will
run it.  With one, it parses the ONNX file with the ``tensorrt`` Python API, builds in fp16 or
int8 (int8 here means TensorRT's implicit int8 where the ONNX graph carries quantize/dequantize
nodes), reuses and updates a timing cache next to the output, and writes ``model.plan`` plus a
manifest entry, both through an :class:`~edgetts.quantization.variants.OutputDir` so a failed
build leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgetts.quantization import QuantizeError
from edgetts.quantization.variants import OutputDir

PRECISIONS = ("fp16", "int8")


def cuda_gpu() -> str | None:
    """The first CUDA GPU's name, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > 0:
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
                return name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no device: no CUDA GPU here
        pass
    return "unknown NVIDIA GPU" if shutil.which("nvidia-smi") and Path("/dev/nvidia0").exists() else None


def compile_engine(onnx_dir: str | Path, precision: str = "fp16", out: str | Path | None = None, log=print) -> Path:
    onnx_dir = Path(onnx_dir)
    if precision not in PRECISIONS:
        raise QuantizeError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    onnx = onnx_dir / "model.onnx" if onnx_dir.is_dir() else onnx_dir
    if not onnx.is_file():
        raise QuantizeError(f"{onnx_dir}: no model.onnx")
    output = OutputDir(Path(out) if out else onnx.parent / f"trt-{precision}")
    gpu = cuda_gpu()
    if gpu is None:
        raise QuantizeError("no CUDA GPU here: TensorRT engines must be built on the target device that runs them")
    try:
        import tensorrt as trt
    except ImportError:
        raise QuantizeError("TensorRT's Python package is not installed (pip install tensorrt on the device)") from None
    with output:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise QuantizeError(f"TensorRT could not parse {onnx}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.INT8)
        cache_path = output.path / "timing.cache"
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise QuantizeError(f"TensorRT could not build an engine from {onnx}")
        output.stage("model.plan").write_bytes(bytes(plan))
        output.stage("timing.cache").write_bytes(bytes(config.get_timing_cache().serialize()))
        output.add("model.plan", "tensorrt", precision, onnx, extra={"gpu": gpu})
    log(f"wrote {output.path / 'model.plan'} for {gpu}")
    return output.path / "model.plan"
