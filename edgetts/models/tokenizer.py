"""The tiny model's tokenizer: byte-level BPE with no learned merges, plus four special tokens.

Every byte is its own token (ids 0-255, in the GPT-2 byte-to-unicode spelling), so any text
tokenizes and the model reads arithmetic one character at a time.  ``<s>`` and ``</s>`` are
control tokens (begin and end of sequence); ``<think>`` and ``</think>`` are user-defined
tokens, split out of plain text by both llama.cpp and Hugging Face ``tokenizers`` without
special-token parsing, so the reasoning delimiters are single tokens a controller can watch.

One merge (two NUL bytes) exists only because GGUF cannot store an empty merge list; NUL
never occurs in text, so it never fires.  The same vocabulary is written to
``tokenizer.json`` and to GGUF metadata, which is what makes the ids identical in both.
"""

from __future__ import annotations

import json
from functools import lru_cache

from edgetts.models.families import TINY_NAME

BOS, EOS, THINK, END_THINK = "<s>", "</s>", "<think>", "</think>"
SPECIAL = (BOS, EOS, THINK, END_THINK)
NUL_MERGE = ("Ā", "Ā")

# GGUF token types (llama.cpp's llama_token_type).
TYPE_NORMAL, TYPE_CONTROL, TYPE_USER_DEFINED = 1, 3, 4


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab() -> list[tuple[str, int]]:
    """(token text, GGUF token type) in id order."""
    b2u = bytes_to_unicode()
    toks = [(b2u[b], TYPE_NORMAL) for b in range(256)]
    toks.append(("".join(NUL_MERGE), TYPE_NORMAL))
    toks += [(BOS, TYPE_CONTROL), (EOS, TYPE_CONTROL)]
    toks += [(THINK, TYPE_USER_DEFINED), (END_THINK, TYPE_USER_DEFINED)]
    return toks


def token_id(text: str) -> int:
    return [t for t, _ in vocab()].index(text)


def tokenizer_json() -> dict:
    """A Hugging Face ``tokenizer.json`` for the vocabulary above."""
    toks = vocab()
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ty == TYPE_CONTROL,
        }
        for i, (t, ty) in enumerate(toks)
        if t in SPECIAL
    ]
    bos = token_id(BOS)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 0}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, (t, _) in enumerate(toks)},
            "merges": [list(NUL_MERGE)],
        },
    }


def write_tokenizer_files(directory) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into a Hugging Face directory."""
    from pathlib import Path

    d = Path(directory)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False, indent=1))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "name_or_path": TINY_NAME,  # how engines without GGUF metadata recognise the tiny model's format
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
