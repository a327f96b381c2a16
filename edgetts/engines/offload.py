"""Where llama.cpp runs a model's layers: asked of llama.cpp itself, never assumed.

``gpu_layers`` is a llama.cpp setting with three meanings:

* absent (``auto``, the default everywhere): every layer on the GPU where this build of llama.cpp
  can offload (``llama_supports_gpu_offload``: a CUDA, Metal, Vulkan... device, or RPC), none
  otherwise;
* ``-1``: every layer (llama.cpp's own convention: the repeating layers plus the output layer);
* ``N >= 0``: the last N layers (llama.cpp offloads from the top), ``0`` keeping all on the CPU.

An explicit request for offload on a build that cannot offload runs on the CPU with a one-line
warning on stderr (once per process), and what ran is recorded (``offload: none``): a profile
must never say "GPU" for a run on the CPU.  :func:`offloaded_layers` is what the memory plan
counts against GPU memory, with the same rule the engine loads by.

:func:`backends` lists the devices ggml registered (for ``edgetts doctor``), read through the
ggml library that llama-cpp-python ships.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

from edgetts.engines.base import EngineError

_warned = False
# llama.cpp reads n_gpu_layers as an int32; more layers than any model has already means all of them (as in C)
MAX_LAYERS = 100_000


def parse_gpu_layers(value: object) -> int | None:
    """``auto`` (or None) -> None; an integer >= -1 as is; anything else a one-line :class:`EngineError`."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value) if not isinstance(value, bool) and str(value).strip().lstrip("-").isdigit() else None
    except ValueError:
        n = None
    if n is None or not -1 <= n <= MAX_LAYERS:
        raise EngineError(f"gpu_layers must be auto, -1 (all layers) or a number of layers from 0 to {MAX_LAYERS}, "
                          f"got {value!r}")  # fmt: skip
    return n


@functools.lru_cache(maxsize=1)
def supports_offload() -> bool:
    """Whether this llama.cpp build has a device to offload to (llama.cpp's own answer)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def llama_gpu_layers(requested: int | None, warn: bool = True) -> int:
    """The ``n_gpu_layers`` to hand llama.cpp for ``requested`` (see the module doc); with ``warn``, an
    explicit request for offload that this build cannot honour is said once on stderr."""
    global _warned
    if supports_offload():
        return -1 if requested is None else requested
    if warn and requested not in (None, 0) and not _warned:
        _warned = True
        sys.stderr.write(f"warning: gpu_layers={requested} asks for GPU offload, but this llama.cpp build has no "
                         "GPU backend: running on the CPU (install llama-cpp-python built with CUDA)\n")  # fmt: skip
    return 0


def offloaded_layers(requested: int | None, layers: int) -> int:
    """Layers llama.cpp puts on the GPU for ``requested``, of ``layers + 1`` (the output layer counts)."""
    n = llama_gpu_layers(requested, warn=False)
    return layers + 1 if n < 0 else min(n, layers + 1)


def _ggml() -> ctypes.CDLL | None:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):  # the registry lives in ggml, not ggml-base
        if (lib / name).exists():
            try:
                return ctypes.CDLL(str(lib / name))
            except OSError:
                continue
    return None


def backends() -> list[dict]:
    """The devices ggml registered: ``{"name", "description", "type"}`` each (type cpu, gpu, igpu, accel)."""
    import llama_cpp

    llama_cpp.llama_supports_gpu_offload()  # loads every backend this build has, as llama.cpp does
    g = _ggml()
    if g is None:
        return []
    try:
        g.ggml_backend_dev_count.restype = ctypes.c_size_t
        g.ggml_backend_dev_get.restype = ctypes.c_void_p
        g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(g, fn).restype = ctypes.c_char_p
            getattr(g, fn).argtypes = [ctypes.c_void_p]
        g.ggml_backend_dev_type.restype = ctypes.c_int
        g.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    except AttributeError:  # an older ggml without the device API
        return []
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        out.append({"name": (g.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace"),
                    "description": (g.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
                    "type": kinds.get(g.ggml_backend_dev_type(dev), "other")})  # fmt: skip
    return out
