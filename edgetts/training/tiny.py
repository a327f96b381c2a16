"""Train the shipped tiny reasoning model on ``arith`` and export it to Hugging Face and GGUF.

    pip install torch==2.13.0 -e ".[train]"
    python -m edgetts.training.tiny --out edgetts/models/tiny

How it works: problems stream from :func:`batch_stream` (chains of 1 to ``--max-ops``
operations, 8 by default, drawn by :func:`edgetts.tasks.arith.generate_from` from training
seeds and filtered so that no question of the evaluation split is ever trained on).  Each example is the prompt
``question\\n<think>`` followed by the worked steps, ``</think>``, ``\\nThe answer is N`` and
``</s>``; the loss covers only the text after the prompt.  The network is a
``transformers`` LlamaForCausalLM (width 256, feed-forward 512, 2 layers, 4 heads, 1.45M parameters), trained
with AdamW, linear warm-up and cosine decay, fully seeded.  The result is saved as
safetensors + config + tokenizer.json, then written as f16 GGUF by
:mod:`edgetts.models.gguf_export`; a final check compares llama.cpp's logits with torch's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from edgetts.models import tokenizer as tok
from edgetts.models.families import FAMILIES
from edgetts.tasks import arith

FAMILY = FAMILIES["tiny"]


def train_levels(max_ops: int) -> list[arith.Level]:
    return [arith.Level(100 + n, n, 99, 9) for n in range(1, max_ops + 1)]


def prompt_text(question: str) -> str:
    return FAMILY.prompt_template.format(question=question)


def completion_text(p: arith.Problem) -> str:
    return "\n".join(p.steps) + "\n" + FAMILY.think_end + FAMILY.answer_prefix + str(p.answer)


def encode(text: str) -> list[int]:
    """Byte-level ids with the four special tokens split out (same ids as tokenizer.json)."""
    ids: list[int] = []
    specials = {s: tok.token_id(s) for s in tok.SPECIAL}
    i = 0
    while i < len(text):
        for s, sid in specials.items():
            if text.startswith(s, i):
                ids.append(sid)
                i += len(s)
                break
        else:
            j = min((k for k in (text.find(s, i) for s in specials) if k >= 0), default=len(text))
            ids.extend(text[i:j].encode("utf-8"))
            i = j
    return ids


def batch_stream(seed: int, exclude: set[str], max_ops: int, batch_size: int):
    """Batches of problems with chain lengths drawn uniformly from 1 to ``max_ops``.

    Mixing lengths inside a batch matters: batches of a single length trained far worse.
    """
    rng = random.Random(f"train-{seed}")
    levels = train_levels(max_ops)
    i = 0
    while True:
        batch = []
        while len(batch) < batch_size:
            p = arith.generate_from(rng.choice(levels), rng, i, prefix="train")
            i += 1
            if p.question not in exclude:
                batch.append(p)
        yield batch


def make_batch(problems, torch):
    seqs, masks = [], []
    batch_size = len(problems)
    for p in problems:
        a = [tok.token_id(tok.BOS), *encode(prompt_text(p.question))]
        b = [*encode(completion_text(p)), tok.token_id(tok.EOS)]
        seqs.append(a + b)
        masks.append([0] * len(a) + [1] * len(b))
    n = max(map(len, seqs))
    pad = tok.token_id(tok.EOS)
    ids = torch.full((batch_size, n), pad, dtype=torch.long)
    labels = torch.full((batch_size, n), -100, dtype=torch.long)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        ids[r, : len(s)] = torch.tensor(s)
        labels[r, : len(s)] = torch.tensor([t if k else -100 for t, k in zip(s, m)])
    return ids, labels


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok.vocab()),
        hidden_size=args.width,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.token_id(tok.BOS),
        eos_token_id=tok.token_id(tok.EOS),
        pad_token_id=tok.token_id(tok.EOS),
    )
    return LlamaForCausalLM(cfg)


def train(args) -> object:
    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    exclude = {p.question for p in arith.eval_split()}
    stream = batch_stream(args.seed, exclude, args.max_ops, args.batch)
    model = build_model(args).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels = make_batch(next(stream), torch)
        out = model(input_ids=ids.to(args.device), labels=labels.to(args.device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step:5d} loss {out.loss.item():.4f} lr {lr:.2e} elapsed {el:6.0f}s", flush=True)
    return model


def save(model, out: Path) -> None:
    from edgetts.models.gguf_export import export_gguf

    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    model.to("cpu").to(dtype=__import__("torch").float16).save_pretrained(hf, safe_serialization=True)
    tok.write_tokenizer_files(hf)
    (hf / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.token_id(tok.BOS), "eos_token_id": tok.token_id(tok.EOS)})
    )
    export_gguf(hf, out / "tiny-f16.gguf", dtype="f16")


def verify_export(out: Path, text: str = "Evaluate left to right: 12+7*3\n<think>12+7=19\n") -> float:
    """Largest difference between torch's and llama.cpp's next-token log-probabilities.

    Raises when the two disagree on the most likely token, which is what a wrong tensor
    layout (for example a missing q/k permutation) produces.
    """
    import llama_cpp
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    ids = [tok.token_id(tok.BOS), *encode(text)]
    hf = LlamaForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    llm = llama_cpp.Llama(model_path=str(out / "tiny-f16.gguf"), logits_all=True, n_ctx=256, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    got = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    top2 = np.sort(ref, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.1  # f16 rounding may reorder near-ties only
    if not (ref.argmax(-1) == got.argmax(-1))[clear].all():
        raise RuntimeError("GGUF export disagrees with the Hugging Face model on the most likely tokens")
    return float(np.abs(ref - got).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("edgetts/models/tiny"))
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-ops", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    t0 = time.time()
    model = train(args)
    save(model, args.out)
    diff = verify_export(args.out)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s; torch vs llama.cpp log-prob max diff {diff:.4f}", flush=True)


if __name__ == "__main__":
    main()
