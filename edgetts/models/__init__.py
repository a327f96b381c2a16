"""Models that ship with edgetts, and how to find them by name.

``tiny`` is a 1.45M-parameter llama-architecture reasoning model trained by
``python -m edgetts.training.tiny`` on the built-in ``arith`` benchmark.  It ships as GGUF
(``tiny/tiny-f16.gguf``, for llama.cpp) and as the Hugging Face directory it was exported
from (``tiny/hf``, for ONNX Runtime GenAI's model builder and other converters), and as
ONNX int4 made from that directory by the builder (``tiny/onnx-int4``).
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent
BUILTIN = {
    "tiny": MODELS_DIR / "tiny" / "tiny-f16.gguf",
}
BUILTIN_HF = {
    "tiny": MODELS_DIR / "tiny" / "hf",
}
BUILTIN_ONNX = {
    "tiny": MODELS_DIR / "tiny" / "onnx-int4",
}


class ModelNotFound(ValueError):
    """A model name or path that names nothing usable."""


def resolve_model(name_or_path: str) -> Path:
    """A built-in model name (``tiny``) or a path to a GGUF file or model directory."""
    if name_or_path in BUILTIN:
        path = BUILTIN[name_or_path]
        if not path.exists():
            raise ModelNotFound(f"built-in model {name_or_path!r} is missing from the install: {path}")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(BUILTIN))
        raise ModelNotFound(f"model {name_or_path!r}: no such file, and not a built-in name ({known})")
    return path
