"""Model variants for the device: GGUF k-quants, ONNX int4/int8/fp16, TensorRT engines, and their manifest."""


class QuantizeError(ValueError):
    """A quantization request that cannot be carried out; the message is one line."""
