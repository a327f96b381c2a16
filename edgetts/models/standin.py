"""Random-weight stand-ins for real reasoning models: real tokenizer, template and shapes.

A stand-in is a GGUF file llama.cpp loads exactly like the model it stands in for: the same
architecture (``qwen3`` or ``qwen2``), the same tensor shapes (so the same compute per token and
the same KV-cache bytes per token), the Qwen2-family BPE vocabulary of 151,936 tokens with the
model's own added tokens at their real ids, and the model's real chat template.  Only the
weights are random (seeded), so its output text is noise; everything edgetts does around a
model (prompt rendering, ``</think>`` forcing, answer extraction, memory planning, step cost on
a large vocabulary) runs as it would on the real one.

Where the pieces come from: llama.cpp keeps a tokenizer-only GGUF of the Qwen2 vocabulary
(``models/ggml-vocab-qwen2.gguf``) and copies of real chat templates (``models/templates/``) in
its sources, which llama-cpp-python's source distribution on the package index carries.
:func:`assets` downloads that distribution once (``pip download``), extracts the three files
into a cache (``$EDGETTS_CACHE`` or ``~/.cache/edgetts``) and reuses them afterwards; no model hub
is involved.  The vocabulary file holds only the three control tokens Qwen2 started with; the
added tokens each model family defines (``<think>``/``</think>`` at 151667/151668 for Qwen3,
at 151648/151649 for DeepSeek-R1-Distill-Qwen, whose ``<｜User｜>``, ``<｜Assistant｜>`` and
sentence markers also replace Qwen's) are written over the padding entries at their real ids,
as the models' own tokenizers define them.

Shapes (:data:`SHAPES`): ``qwen3-0.6b`` (28 layers, width 1024, 16 query heads and 8 KV heads of
128, feed-forward 3072, per-head q/k norms, tied embeddings) and ``r1-distill-qwen-1.5b`` (28
layers, width 1536, 12 query heads and 2 KV heads of 128, feed-forward 8960, biases on q/k/v,
untied output), plus ``narrow-qwen3`` and ``narrow-r1``: the same vocabulary, template and
architecture with two thin layers, small enough for tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

VOCAB_FILE = "ggml-vocab-qwen2.gguf"
TEMPLATES = {
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "deepseek-r1": "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
}
NAME_MARK = "edgetts stand-in for"  # general.name prefix: marks files this module may overwrite
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types: special tokens, and added non-special ones

# Added tokens at their real ids: (id, text, special).  Non-special ones (the think markers,
# tool calls) are user-defined tokens, as llama.cpp's converter writes them.
_QWEN_SHARED = [
    (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True), (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True), (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True), (151657, "<tool_call>", False), (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False), (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
]  # fmt: skip
ADDED = {
    "qwen3": [
        (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
        (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True),
        (151648, "<|box_start|>", True), (151649, "<|box_end|>", True), *_QWEN_SHARED,
        (151665, "<tool_response>", False), (151666, "</tool_response>", False),
        (151667, "<think>", False), (151668, "</think>", False),
    ],
    "deepseek-r1": [
        (151643, "<｜end▁of▁sentence｜>", True), (151644, "<｜User｜>", False), (151645, "<｜Assistant｜>", False),
        (151646, "<｜begin▁of▁sentence｜>", True), (151647, "<|EOT|>", False),
        (151648, "<think>", False), (151649, "</think>", False), *_QWEN_SHARED,
    ],
}  # fmt: skip
# (bos, eos, add_bos) as the real models' GGUF conversions carry them.
SPECIAL_IDS = {"qwen3": (151643, 151645, False), "deepseek-r1": (151646, 151643, True)}
THINK_IDS = {"qwen3": (151667, 151668), "deepseek-r1": (151648, 151649)}


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # llama.cpp architecture
    family: str  # reasoning family (edgetts.models.families), also the vocabulary's added tokens
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    rope_base: float
    context: int
    real_name: str

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V cache bytes per token, all layers (what llama.cpp allocates by default)."""
        return 2 * 2 * self.layers * self.kv_heads * self.head_dim


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("qwen3-0.6b", "qwen3", "qwen3", 28, 1024, 16, 8, 128, 3072, True, False, True, 1e6, 40960,
              "Qwen3-0.6B"),
        Shape("r1-distill-qwen-1.5b", "qwen2", "deepseek-r1", 28, 1536, 12, 2, 128, 8960, False, True, False,
              1e4, 131072, "DeepSeek-R1-Distill-Qwen-1.5B"),
        Shape("narrow-qwen3", "qwen3", "qwen3", 2, 64, 4, 2, 16, 128, True, False, True, 1e6, 40960, "Qwen3-0.6B"),
        Shape("narrow-r1", "qwen2", "deepseek-r1", 2, 64, 4, 2, 16, 128, False, True, False, 1e4, 131072,
              "DeepSeek-R1-Distill-Qwen-1.5B"),
    )
}  # fmt: skip


class StandinError(ValueError):
    """A stand-in that cannot be built (unknown shape, assets unavailable)."""


def cache_dir() -> Path:
    root = os.environ.get("EDGETTS_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "edgetts"
    if path.exists() and not path.is_dir():
        raise StandinError(f"{'EDGETTS_CACHE=' if root else 'the cache '}{path} is not a directory")
    return path


def assets(version: str | None = None) -> Path:
    """The folder holding the Qwen2 vocabulary GGUF and the two templates, downloaded once per machine."""
    version = version or metadata.version("llama-cpp-python")
    folder = cache_dir() / f"llama.cpp-models-{version}"
    wanted = [VOCAB_FILE, *(f"templates/{t}" for t in TEMPLATES.values())]
    if all((folder / w).is_file() for w in wanted):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine, even with tests in parallel
        if all((folder / w).is_file() for w in wanted):
            return folder
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"llama-cpp-python=={version}", "-d", tmp]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode != 0 or not sdists:
                why = (done.stderr.strip().splitlines() or ["no source distribution"])[-1]
                raise StandinError(f"could not download llama-cpp-python {version}'s sources: {why}")
            stage = Path(tmp) / "models"
            with tarfile.open(sdists[0]) as tar:
                for member in tar.getmembers():
                    rel = member.name.split("/vendor/llama.cpp/models/", 1)
                    if len(rel) == 2 and rel[1] in wanted and member.isfile():
                        target = stage / rel[1]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(member).read())
            missing = [w for w in wanted if not (stage / w).is_file()]
            if missing:
                raise StandinError(f"llama-cpp-python {version}'s sources lack {', '.join(missing)}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(folder, Path(tmp) / "old")
            os.rename(stage, folder)
    return folder


def template(family: str) -> str:
    return (assets() / "templates" / TEMPLATES[family]).read_text()


def vocabulary(family: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the Qwen2 vocabulary with ``family``'s added tokens in place."""
    import json

    folder = assets()
    flat = folder / "qwen2-vocab.json"  # parsing the GGUF takes seconds; its lists as JSON load in a fraction
    if not flat.is_file():
        from gguf import GGUFReader

        from edgetts.fileio import write_json_atomic

        fields = GGUFReader(folder / VOCAB_FILE).fields

        def strings(key):
            f = fields[key]
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

        f = fields["tokenizer.ggml.token_type"]
        types = [int(f.parts[i][0]) for i in f.data]
        write_json_atomic(flat, {"tokens": strings("tokenizer.ggml.tokens"), "types": types,
                                 "merges": strings("tokenizer.ggml.merges")})  # fmt: skip
    data = json.loads(flat.read_text())
    tokens, types, merges = data["tokens"], data["types"], data["merges"]
    for tid, text, special in ADDED[family]:
        tokens[tid] = text
        types[tid] = CONTROL if special else USER_DEFINED
    return tokens, types, merges


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, is a norm weight) in llama.cpp's naming; numpy shapes are [out, in]."""
    h, q, kv, v = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, 151936
    out = [("token_embd.weight", (v, h), False), ("output_norm.weight", (h,), True)]
    if not shape.tied:
        out.append(("output.weight", (v, h), False))
    for i in range(shape.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,), True), (b + "attn_q.weight", (q, h), False),
                (b + "attn_k.weight", (kv, h), False), (b + "attn_v.weight", (kv, h), False),
                (b + "attn_output.weight", (h, q), False), (b + "ffn_norm.weight", (h,), True),
                (b + "ffn_gate.weight", (shape.ffn, h), False), (b + "ffn_up.weight", (shape.ffn, h), False),
                (b + "ffn_down.weight", (h, shape.ffn), False)]  # fmt: skip
        if shape.qkv_bias:
            out += [(b + "attn_q.bias", (q,), False), (b + "attn_k.bias", (kv,), False),
                    (b + "attn_v.bias", (kv,), False)]  # fmt: skip
        if shape.qk_norm:
            out += [(b + "attn_q_norm.weight", (shape.head_dim,), True),
                    (b + "attn_k_norm.weight", (shape.head_dim,), True)]  # fmt: skip
    return out


def write_standin(shape_name: str, out: str | Path, seed: int = 0, dtype: str = "f16") -> Path:
    """Write the stand-in ``shape_name`` to ``out`` (written to a temporary name, then renamed)."""
    import gguf

    if shape_name not in SHAPES:
        raise StandinError(f"unknown shape {shape_name!r}; choose one of: {', '.join(SHAPES)}")
    if dtype not in ("f16", "f32"):
        raise StandinError(f"dtype must be f16 or f32, got {dtype!r}")
    from edgetts.outputs import OutputError, check_output

    s = SHAPES[shape_name]
    try:  # never over a file that is not a stand-in
        out = check_output(out, ours=_is_standin)
    except OutputError as e:
        raise StandinError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens, types, merges = vocabulary(s.family)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        _write(gguf, s, tmp, tokens, types, merges, seed, dtype)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


def _is_standin(path: Path) -> bool:
    """A GGUF file this module wrote: its name, in the header, carries :data:`NAME_MARK`."""
    from edgetts.outputs import contains, starts_with

    return starts_with("GGUF")(path) and contains(NAME_MARK, within=1 << 12)(path)


def _write(gguf, s: Shape, tmp: Path, tokens, types, merges, seed: int, dtype: str) -> None:
    bos, eos, add_bos = SPECIAL_IDS[s.family]
    w = gguf.GGUFWriter(tmp, s.arch)
    w.add_name(f"{NAME_MARK} {s.real_name} ({s.name}, random weights)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(151643)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(template(s.family))
    specs = _tensors(s)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    for name, shp, norm in specs:
        # llama.cpp keeps norms and biases in f32 whatever the file type (as its converter does).
        dt = np.float32 if norm or len(shp) == 1 else np_dtype
        w.add_tensor_info(name, shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, shp, norm in specs:
        dt = np.float32 if norm or len(shp) == 1 else np_dtype
        if norm:
            data = np.ones(shp, dtype=dt)
        else:  # init scale of the real models' configs; rows drawn in chunks to bound memory
            data = np.empty(shp, dtype=dt)
            flat = data.reshape(-1)
            for i in range(0, flat.size, 1 << 24):
                flat[i : i + (1 << 24)] = rng.standard_normal(min(1 << 24, flat.size - i), np.float32) * 0.02
        w.write_tensor_data(data)
    w.close()
