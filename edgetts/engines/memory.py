"""What a llama.cpp engine will need in memory, known before the model is loaded.

A GGUF file's header says everything the allocation depends on: the tensors' bytes (the
weights, mapped from the file), and the layer count, KV-head count and key/value lengths (the
cache bytes per token).  :func:`gguf_info` reads just the header (seeking over the tokenizer's
arrays), so planning a 151,936-token model costs a fraction of a second.

:func:`plan_memory` adds up what llama.cpp allocates for a context planned by
:class:`~edgetts.engines.spec.ContextPlan`, with the same sizes the engine asks for:

- ``weights``: the tensors' bytes, plus, on the CPU, the copy llama.cpp makes of Q4_0, Q4_K and
  IQ4_NL matrices in an interleaved layout its kernels read faster (the mapped originals are
  then no longer read, but they were paged in to be copied);
- ``kv``: ``n_ctx`` cells (rounded up to llama.cpp's 256-cell padding) times the f16 K and V
  bytes per token of all layers: ``2 x layers x kv_heads x (key_length + value_length)``;
- ``output``: one float logit vector per sequence (the engine's ``n_seq_max``: rows and their
  probe branches with a unified cache, the rows alone with a cache stream per row);
- ``compute``: the scratch of one micro-batch of ``n_ubatch`` tokens, dominated by the
  logits of a micro-batch whose tokens all want outputs (``n_ubatch x n_vocab`` floats) plus its
  activations.

With a cache stream per row (``kv_unified`` false) each stream is padded to 256 cells on its own
(:func:`cache_cells`, as the pinned llama.cpp's ``llama_context`` does).  Offloaded layers
(:mod:`edgetts.engines.offload`) put their share of the weights and cache, and the compute
scratch, in GPU memory; only the layers kept on the CPU are repacked.

:func:`shortfall` weighs a plan against the memory the device can give: MemAvailable for the
CPU (and a Jetson, whose GPU shares it), NVML's free memory of GPU 0 for offloaded parts on a
discrete GPU, never more than the user's cap (``--memory-mb`` or ``EDGETTS_MEMORY_MB``).
:func:`check_fits` refuses a plan that exceeds it with one line naming every part, before
anything is loaded.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from edgetts.engines.base import EngineError

MB = 1 << 20
KV_PAD = 256  # llama.cpp rounds a context's cells up to this
# GGUF value types -> struct format (8: string, 9: array)
# Quantization types whose matrices the CPU back end repacks at load (ggml type: block, bytes).
_REPACKED = {2: (32, 18), 12: (256, 144), 20: (32, 18)}  # Q4_0, Q4_K, IQ4_NL
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GGUFInfo:
    arch: str
    layers: int
    kv_heads: int
    key_length: int
    value_length: int
    n_vocab: int
    hidden: int
    ffn: int
    weight_bytes: int
    repack_bytes: int = 0  # matrices llama.cpp's CPU back end copies into an interleaved layout

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V bytes of one cache cell, all layers."""
        return 2 * self.layers * self.kv_heads * (self.key_length + self.value_length)


def gguf_info(path: str | Path) -> GGUFInfo:
    """The shape fields of a GGUF file, read from its header only (cached while the file is unchanged)."""
    st = Path(path).stat()
    try:
        return _gguf_info(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    except (struct.error, KeyError, IndexError, OverflowError) as e:  # truncated, or a type this reader does not know
        raise EngineError(f"{path}: unreadable GGUF header ({e})") from None


@functools.lru_cache(maxsize=32)
def _gguf_info(path: str, _mtime: int, _size: int) -> GGUFInfo:
    path = Path(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise EngineError(f"{path}: not a GGUF file (bad magic bytes)")
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        pos = 24
        kv: dict[str, object] = {}

        def string(p):
            (n,) = struct.unpack_from("<Q", m, p)
            return m[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

        def value(p, t):
            if t == 8:
                return string(p)
            if t == 9:
                et, count = struct.unpack_from("<IQ", m, p)
                p += 12
                if et == 8:  # strings: skip over them, keep only the count
                    for _ in range(count):
                        (n,) = struct.unpack_from("<Q", m, p)
                        p += 8 + n
                    return count, p
                if et == 9:
                    raise EngineError(f"{path}: nested GGUF arrays are not supported")
                return count, p + count * struct.calcsize(_SCALARS[et])
            fmt = "<" + _SCALARS[t]
            return struct.unpack_from(fmt, m, p)[0], p + struct.calcsize(fmt)

        for _ in range(n_kv):
            key, pos = string(pos)
            (t,) = struct.unpack_from("<I", m, pos)
            kv[key], pos = value(pos + 4, t)
        repack = 0
        for _ in range(n_tensors):  # name, dims, type, offset
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", m, pos)
            dims = struct.unpack_from(f"<{nd}Q", m, pos + 4)
            (ttype,) = struct.unpack_from("<I", m, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 4 + 8
            if ttype in _REPACKED and nd == 2 and name != "token_embd.weight" and dims[1] % 8 == 0:
                block, size = _REPACKED[ttype]
                repack += dims[0] * dims[1] // block * size
        align = int(kv.get("general.alignment", 32))
        data_start = int(math.ceil(pos / align) * align)
        size = len(m)
    arch = str(kv.get("general.architecture", "llama"))

    def field(name, default=None):
        v = kv.get(f"{arch}.{name}", default)
        if v is None:
            raise EngineError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return int(v)

    hidden, heads = field("embedding_length"), field("attention.head_count")
    head_dim = hidden // max(1, heads)
    return GGUFInfo(
        arch=arch, layers=field("block_count"), kv_heads=field("attention.head_count_kv", heads),
        key_length=field("attention.key_length", head_dim), value_length=field("attention.value_length", head_dim),
        n_vocab=int(kv.get("tokenizer.ggml.tokens", 0)) or field("vocab_size"), hidden=hidden,
        ffn=field("feed_forward_length", 4 * hidden), weight_bytes=size - data_start, repack_bytes=repack,
    )  # fmt: skip


class MemoryShortfall(EngineError):
    """A plan that needs more memory than the device has free (or the cap allows)."""


@dataclass(frozen=True)
class MemoryPlan:
    n_ctx: int  # cache cells, as llama.cpp allocates them
    weights: int
    kv: int
    output: int
    compute: int
    gpu: int = 0  # of the total, the bytes in GPU memory (offloaded layers' weights and cache, compute)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.output + self.compute

    def __add__(self, other: MemoryPlan) -> MemoryPlan:
        """Two engines side by side (the cells are the larger context's)."""
        return MemoryPlan(max(self.n_ctx, other.n_ctx), self.weights + other.weights, self.kv + other.kv,
                          self.output + other.output, self.compute + other.compute, self.gpu + other.gpu)  # fmt: skip

    @property
    def total_mb(self) -> float:
        return self.total / MB

    @property
    def host(self) -> int:
        return self.total - self.gpu

    def describe(self) -> str:
        on_gpu = f"; {self.gpu / MB:.0f} MB of it on the GPU" if self.gpu else ""
        return (f"{self.total_mb:.0f} MB: weights {self.weights / MB:.0f}, KV cache {self.kv / MB:.0f} "
                f"({self.n_ctx} tokens), compute {(self.compute + self.output) / MB:.0f}{on_gpu}")  # fmt: skip


def cache_cells(n_ctx: int, n_seq: int, kv_unified: bool = True) -> int:
    """The cells llama.cpp allocates for ``n_ctx`` (``llama_context``'s constructor): the context is
    padded to 256; with a stream per sequence each stream gets ``n_ctx / n_seq`` cells padded to 256
    again, so every stream may carry up to 255 cells more than it asked for."""
    cells = KV_PAD * math.ceil(n_ctx / KV_PAD)
    if kv_unified:
        return cells
    return n_seq * KV_PAD * math.ceil((cells // n_seq) / KV_PAD)


def plan_memory(info: GGUFInfo, n_ctx: int, max_rows: int, n_ubatch: int = 512, gpu_layers: int = 0,
                kv_unified: bool = True) -> MemoryPlan:  # fmt: skip
    """What llama.cpp allocates for ``info``'s model with a context of ``n_ctx`` cells (see the module doc),
    ``gpu_layers`` of its ``layers + 1`` offloaded (:func:`edgetts.engines.offload.offloaded_layers`)."""
    seqs = 2 * max_rows if kv_unified else max_rows  # the engine's n_seq_max (probe branches need a unified cache)
    cells = cache_cells(n_ctx, seqs, kv_unified)
    activations = n_ubatch * 4 * (3 * info.hidden + 2 * info.ffn)
    share = min(gpu_layers, info.layers + 1) / (info.layers + 1)  # of the weights, by layer
    kv = cells * info.kv_bytes_per_token
    compute = n_ubatch * info.n_vocab * 4 + activations
    # The CPU back end repacks only the matrices it keeps; offloaded layers' cache and the compute
    # scratch live on the GPU, the logits of every sequence in host memory.
    gpu = int(info.weight_bytes * share + kv * min(gpu_layers, info.layers) / info.layers) + (compute if share else 0)
    return MemoryPlan(
        n_ctx=cells, weights=info.weight_bytes + int(info.repack_bytes * (1 - share)), kv=kv,
        output=seqs * info.n_vocab * 4, compute=compute, gpu=gpu,
    )  # fmt: skip


def memory_cap_mb(cap: float | None = None) -> float | None:
    """A user's cap on the memory any command may plan for (``--memory-mb``, else ``EDGETTS_MEMORY_MB``)."""
    if cap is not None:
        return cap
    env = os.environ.get("EDGETTS_MEMORY_MB", "").strip()
    if not env:
        return None
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise EngineError(f"EDGETTS_MEMORY_MB must be a positive number of megabytes, got {env!r}")
    return value


def _gpu_free_mb() -> float | None:
    """Free memory of GPU 0 through NVML, or None (no NVML: a Jetson's GPU shares host memory)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free / MB
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no GPU
        return None


def _host_available_mb() -> float | None:
    from edgetts.telemetry.device import proc_kb

    kb = proc_kb("/proc/meminfo", "MemAvailable")
    return None if kb is None else kb / 1024


def shortfall(plan: MemoryPlan, cap: float | None = None, share: float = 1.0) -> tuple[float, float] | None:
    """(MB needed, MB free) of the first memory ``plan`` does not fit in (``share`` of it), or None.

    The memory the device can give: with a discrete GPU (NVML answers) the offloaded part against
    the GPU's free memory and the rest against MemAvailable; otherwise (the CPU, or a Jetson, whose
    GPU shares host memory) the whole plan against MemAvailable; never more than the user's cap.
    """
    cap = memory_cap_mb(cap)

    def limited(free: float | None) -> float | None:
        return free if cap is None else cap if free is None else min(free, cap)

    gpu_free = _gpu_free_mb() if plan.gpu else None
    host = limited(_host_available_mb())
    parts = [(plan.gpu, limited(gpu_free)), (plan.host, host)] if gpu_free is not None else [(plan.total, host)]
    for need, free in parts:
        if free is not None and need / MB > free * share:
            return need / MB, free
    return None


def check_fits(plan: MemoryPlan, what: str, cap: float | None = None,
               hint: str = "Lower n or the budget, or pass a smaller n_ctx engine option") -> None:  # fmt: skip
    """Refuse (one line) a plan that needs more memory than the device has free (or the cap allows)."""
    short = shortfall(plan, cap)
    if short is not None:
        cap = memory_cap_mb(cap)
        where = "the cap allows" if cap is not None and short[1] >= cap else "free"
        raise MemoryShortfall(f"{what} needs {plan.describe()}; the device has {short[1]:.0f} MB {where}. {hint}")
