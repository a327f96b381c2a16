"""The TensorRT engine spec: a ``model.plan`` built by ``edgetts compile``, run on its own GPU.

A TensorRT plan is tied to the GPU model, driver and TensorRT version it was built with, so
opening one is a chain of capability checks, each refused with a one-line reason: the plan
exists; a CUDA GPU is here; the ``tensorrt`` package imports; the plan deserializes on this
GPU (a plan from another GPU or TensorRT version does not); and its bindings are those of a
decoder exported by onnxruntime-genai's builder (``input_ids`` in, ``logits`` out, a
``past_key_values.*`` / ``present.*`` pair per layer).

What it does not do yet, and says so when asked: decode.  The decode loop over a plan's KV
bindings (device buffers per layer, one execution context per row) is not written; until it
is, a plan that passes every check is refused with the way to run the same model on the
same GPU (the ONNX directory through ``onnx-genai`` with ``provider: cuda``).  Sweeps, Pareto
points and the runtime carry ``tensorrt`` specs like any other, so nothing else changes when
the loop lands.
"""

from __future__ import annotations

from pathlib import Path

from edgetts.engines.base import Engine, EngineError


def plan_path(artifact: str) -> Path:
    p = Path(artifact).expanduser()
    plan = p / "model.plan" if p.is_dir() else p
    if not plan.is_file():
        raise EngineError(f"{artifact}: no TensorRT plan (model.plan); build one with edgetts compile on this GPU")
    return plan


def check_bindings(names: list[str]) -> None:
    """The plan's tensors must be those of a GenAI-exported decoder."""
    missing = [n for n in ("input_ids", "logits") if n not in names]
    past = [n for n in names if n.startswith("past_key_values.")]
    if missing or not past:
        what = ", ".join(missing) if missing else "past_key_values.* inputs"
        raise EngineError(f"the TensorRT plan is not a decoder with a KV cache (no {what})")


class TensorRTEngine(Engine):
    name = "tensorrt"
    steppable = True  # what the loop will offer; nothing reaches sample() before it exists

    @classmethod
    def open(cls, spec, plan) -> TensorRTEngine:
        from edgetts.quantization.tensorrt import cuda_gpu

        path = plan_path(spec.artifact)
        gpu = cuda_gpu()
        if gpu is None:
            raise EngineError("no CUDA GPU here: a TensorRT plan runs only on the GPU it was built for")
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("TensorRT's Python package is not installed (pip install tensorrt on the device)") \
                from None
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"{path}: TensorRT could not load this plan on {gpu} (built for another GPU or version?)")
        check_bindings([engine.get_tensor_name(i) for i in range(engine.num_io_tensors)])
        raise EngineError(f"{path}: decoding through a TensorRT plan is not supported yet; run its ONNX directory "
                          f"with --engine onnx-genai --engine-option provider=cuda on {gpu}")  # fmt: skip

    def sample(self, prompt, n, params, controller=None, seeds=None):  # pragma: no cover - open() never returns
        raise EngineError("the TensorRT engine cannot decode yet")

    def tokenize(self, text: str) -> list[int]:  # pragma: no cover - open() never returns
        raise EngineError("the TensorRT engine cannot tokenize yet")
