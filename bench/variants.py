"""Benchmark: size, decode speed and accuracy of every variant in a quantize manifest.

    edgetts quantize tiny --to q8_0,q6_k,q5_k_m,q4_k_m,q4_0 --onnx int4:cpu --out runs/variants
    python bench/variants.py runs/variants/manifest.json [--threads 2] [--limit 500]

Per artifact (plus the f16 original): file size, bits per weight, single-row decode speed
(128 tokens, end of sequence masked, best of 3), and on ``arith`` the single-sample accuracy
and majority-of-8 accuracy from 8 rows per problem (row seeds 0..7).  GGUF variants run on
llama.cpp, ONNX ones on ONNX Runtime GenAI (CPU).  One JSON line per artifact, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetts.engines import FORMATS, EngineSpec, SamplingParams, open_engine
from edgetts.models import BUILTIN
from edgetts.models.families import FAMILIES
from edgetts.quantization.manifest import load
from edgetts.strategies.aggregate import majority_vote
from edgetts.tasks.datasets import load_dataset
from edgetts.tasks.grading import extract_answer, is_equivalent


def measure(engine, examples, fam) -> dict:
    prompt = fam.prompt_template.format(question=examples[-1].question)
    speeds = []
    for _ in range(3):
        t = time.perf_counter()
        r = engine.sample(prompt, 1, SamplingParams(max_tokens=128, ignore_eos=True, seed=1))
        speeds.append(r.rows[0].n_generated / (time.perf_counter() - t - r.ttft))
    single = major = 0.0
    for ex in examples:
        res = engine.sample(fam.prompt_template.format(question=ex.question), 8, SamplingParams(max_tokens=160))
        answers = [extract_answer(t) for t in res.texts]
        single += sum(is_equivalent(a, ex.answer) for a in answers) / 8
        major += is_equivalent(majority_vote(answers).answer, ex.answer)
    return {"decode_tok_s": round(max(speeds), 1), "single": round(single / len(examples), 4),
            "majority_of_8": round(major / len(examples), 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    fam = FAMILIES["tiny"]
    examples = load_dataset("arith", limit=args.limit, seed=0 if args.limit else None)
    mpath = Path(args.manifest)
    rows = [{"path": str(BUILTIN["tiny"]), "format": "gguf", "type": "f16", "bytes": BUILTIN["tiny"].stat().st_size}]
    rows += [dict(a, path=str(mpath.parent / a["path"])) for a in load(mpath)["artifacts"]]
    out = []
    for a in rows:
        if a["format"] not in FORMATS:
            continue
        spec = EngineSpec(FORMATS[a["format"]], a["path"]).with_options(threads=args.threads)
        engine, _ = open_engine(spec, max_rows=8, max_tokens=200)
        res = {"format": a["format"], "type": a["type"], "mib": round(a["bytes"] / 2**20, 3),
               "bits_per_weight": a.get("bits_per_weight"), **measure(engine, examples, fam)}  # fmt: skip
        out.append(res)
        print(json.dumps(res), flush=True)
    print(json.dumps({"problems": len(examples), "threads": args.threads, "variants": out}))


if __name__ == "__main__":
    main()
