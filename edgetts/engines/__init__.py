"""Inference engines, chosen by name from a registry.

Each engine lives in its own module and imports its heavy dependency only when
constructed, so ``import edgetts.engines`` stays cheap.  :func:`create` looks a name up
in :data:`REGISTRY` (``"module:Class"`` strings, imported on first use);
:func:`open_engine` opens one from an engine spec (:mod:`edgetts.engines.spec`), with the
context sized from what the caller will decode.  :data:`FORMATS` maps the ``format`` of a
model artifact (as quantize manifests name it) to the engine that runs it.
"""

from __future__ import annotations

import importlib

from edgetts.engines.base import Control, Engine, EngineError, Row, SampleResult, SamplingParams
from edgetts.engines.spec import ContextPlan, EngineSpec, open_engine

REGISTRY: dict[str, str] = {
    "llama.cpp": "edgetts.engines.llamacpp:LlamaCppEngine",
    "onnx-genai": "edgetts.engines.onnx_genai:OnnxGenAIEngine",
    "openai-http": "edgetts.engines.openai_http:OpenAIHTTPEngine",
    "tensorrt": "edgetts.engines.tensorrt:TensorRTEngine",
    "fake": "edgetts.engines.fake:FakeEngine",
}
FORMATS: dict[str, str] = {"gguf": "llama.cpp", "onnx": "onnx-genai", "tensorrt": "tensorrt"}


def engine_class(name: str) -> type[Engine]:
    if name not in REGISTRY:
        raise EngineError(f"unknown engine {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, *args, **kwargs) -> Engine:
    """An engine by registry name, constructed with the given options."""
    return engine_class(name)(*args, **kwargs)


__all__ = ["FORMATS", "REGISTRY", "ContextPlan", "Control", "Engine", "EngineError", "EngineSpec", "Row",
           "SampleResult", "SamplingParams", "create", "open_engine"]
