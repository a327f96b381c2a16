"""Model variants for the device: GGUF k-quants, ONNX int4/int8/fp16, TensorRT engines, and their manifest."""

import importlib.util


class QuantizeError(ValueError):
    """A quantization request that cannot be carried out; the message is one line."""


def importable(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (torch takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module blocked in sys.modules
        return False
