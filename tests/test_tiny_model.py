"""The shipped tiny model: its files, its GGUF shape, and tokenizer agreement."""

import json

import pytest

from edgetts.models import tokenizer as tok
from edgetts.models.families import FAMILIES
from edgetts.tasks import arith


def test_shipped_files_exist_and_fit(tiny_gguf, tiny_hf):
    assert tiny_gguf.stat().st_size <= 16 * 1024 * 1024
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tiny_hf / name).is_file(), name
    cfg = json.loads((tiny_hf / "config.json").read_text())
    assert cfg["model_type"] == "llama"


def test_gguf_is_llama_with_kquant_friendly_dims(tiny_gguf):
    from gguf import GGUFReader

    r = GGUFReader(str(tiny_gguf))

    def field(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0] if f.types[0].name != "STRING" else bytes(f.parts[f.data[0]]).decode()

    assert field("general.architecture") == "llama"
    assert field("llama.embedding_length") % 256 == 0
    assert field("llama.feed_forward_length") % 256 == 0
    assert field("tokenizer.ggml.model") == "gpt2"
    # Every matrix's row length (ne0) must be a multiple of 256 for the k-quants.
    for t in r.tensors:
        if len(t.shape) == 2:
            assert int(t.shape[0]) % 256 == 0, t.name


def test_tokenizer_ids_match_llama_cpp_on_whole_eval_split(tiny_gguf, tiny_hf):
    import llama_cpp
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False)
    fam = FAMILIES["tiny"]
    texts = []
    for p in arith.eval_split():
        prompt = fam.prompt_template.format(question=p.question)
        texts.append(prompt + "\n".join(p.steps) + "\n" + fam.think_end + fam.answer_prefix + str(p.answer))
    texts += ["héllo wörld — 🙂", "  two  spaces\tand tab", "<think>x</think><think>", ""]
    mismatches = [t for t in texts if hf.encode(t).ids != llm.tokenize(t.encode(), add_bos=True, special=False)]
    assert not mismatches, mismatches[:3]
    # The reasoning delimiters are single tokens on both sides.
    for s in (tok.THINK, tok.END_THINK):
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == [tok.token_id(s)]


@pytest.mark.parametrize("text", ["Evaluate left to right: 3+4", "</think>\nThe answer is 7"])
def test_detokenize_round_trip(tiny_engine, text):
    ids = tiny_engine.tokenize(text)
    assert b"".join(tiny_engine.piece(t) for t in ids).decode() == text
