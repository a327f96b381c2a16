"""Write a llama-architecture Hugging Face checkpoint as a GGUF file llama.cpp loads natively.

Hugging Face stores llama weights as ``[out, in]`` matrices and applies rotary embeddings to
the two halves of each head (``rotate_half``); llama.cpp's ``llama`` architecture rotates
adjacent pairs.  So the query and key projections are permuted per head, exactly as
llama.cpp's own converter does, and every other tensor is renamed one to one.  The tokenizer
is the byte-level vocabulary of :mod:`edgetts.models.tokenizer`, written as a ``gpt2``
(BPE) tokenizer with its token types, so llama.cpp tokenizes exactly like ``tokenizer.json``.

Only what the tiny model uses is supported (llama, untied output head, no rope scaling);
anything else is refused with a clear message rather than written wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgetts.models import tokenizer as tok

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder a q/k projection from half-split rotary layout to llama.cpp's paired layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        rest = ".".join(parts[3:])
        if rest in _LAYER_MAP:
            return f"blk.{parts[2]}.{_LAYER_MAP[rest]}"
    raise ValueError(f"tensor {hf_name!r} has no llama GGUF name")


def export_gguf(hf_dir: str | Path, out: str | Path, dtype: str = "f16", name: str = "edgetts-tiny") -> Path:
    """Convert ``hf_dir`` (config.json + model.safetensors) into a GGUF file at ``out``."""
    import gguf
    from safetensors.numpy import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{hf_dir}: model_type {cfg.get('model_type')!r} is not llama")
    if cfg.get("rope_scaling"):
        raise ValueError(f"{hf_dir}: rope scaling is not supported by this exporter")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[dtype]

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_rope_freq_base(float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(ftype)

    toks = tok.vocab()
    if len(toks) != cfg["vocab_size"]:
        raise ValueError(f"{hf_dir}: vocab_size {cfg['vocab_size']} does not match the tokenizer ({len(toks)})")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in toks])
    w.add_token_types([ty for _, ty in toks])
    w.add_token_merges([" ".join(tok.NUL_MERGE)])
    w.add_bos_token_id(tok.token_id(tok.BOS))
    w.add_eos_token_id(tok.token_id(tok.EOS))
    w.add_pad_token_id(tok.token_id(tok.EOS))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    tensors = load_file(str(hf_dir / "model.safetensors"))
    for hf_name in sorted(tensors):
        data = tensors[hf_name].astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        # Norm vectors stay f32 (llama.cpp expects that); matrices take the file's type.
        if dtype == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        w.add_tensor(gguf_name(hf_name), data)

    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
