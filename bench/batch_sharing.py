"""Requests one by one against requests sharing one batch: throughput and identical rows.

    python bench/batch_sharing.py [--requests 40] [--n 8] [--concurrency 8] [--threads 1]

The same majority-of-n requests (one per ``arith`` problem, seeds by index) run one after
another on a plain engine, then ``--concurrency`` at a time through a
:class:`~edgetts.engines.batching.BatchedEngine` (every request's rows in one running batch),
once with one unified KV cache and once with a cache stream per row.  Each line is one JSON
object: the wall time of each side, how many rows came out identical token for token, and the
scheduler's fitted step cost (seconds per decode round, plus seconds per token in it).  The
first line is what batching can buy on this device at all: one decode step of 1 to 32 rows
(a cache stream each, 40 tokens of context), in ms per step and per row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetts.engines import SamplingParams, open_engine
from edgetts.engines.batching import BatchedEngine
from edgetts.strategies import RunConfig, create
from edgetts.tasks.datasets import load_dataset


def decode_widths(threads: int, widths=(1, 2, 4, 8, 16, 32), steps: int = 150) -> dict:
    """ms of one llama_decode carrying one token of each of ``widths`` rows (best of three runs)."""
    from edgetts.engines.llamacpp import LlamaCppEngine
    from edgetts.models import resolve_model

    most = max(widths)
    e = LlamaCppEngine(resolve_model("tiny"), n_ctx=most * 256, n_threads=threads, max_rows=most, kv_unified=False)
    tok = e.lc.llama_vocab_bos(e.vocab)
    out = {}
    try:
        for w in widths:
            best = math.inf
            for _ in range(3):
                e.lc.llama_memory_clear(e.mem, True)
                e._decode([(tok, pos, s, False) for s in range(w) for pos in range(40)])
                t = time.perf_counter()
                for k in range(steps):
                    if e._decode([(tok, 40 + k, s, True) for s in range(w)]) != 0:
                        raise RuntimeError("llama_decode failed")
                best = min(best, (time.perf_counter() - t) / steps)
            out[w] = round(1000 * best, 4)
    finally:
        e.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    step = decode_widths(args.threads)
    print(json.dumps({"decode_ms_by_rows": step, "ms_per_row": {w: round(ms / w, 4) for w, ms in step.items()},
                      "threads": args.threads}), flush=True)  # fmt: skip
    problems = load_dataset("arith", limit=args.requests, seed=0)
    rows = args.concurrency * args.n  # room for every concurrent request at once
    max_tokens = args.budget + RunConfig().answer_tokens

    def run(engine, family, i):
        cfg = RunConfig(n=args.n, budget=args.budget, sampling=SamplingParams(seed=i))
        return create("majority", engine, family, cfg).run(problems[i].question)

    plain, family = open_engine({"artifact": "tiny", "options": {"threads": args.threads}}, max_rows=args.n,
                                max_tokens=max_tokens)  # fmt: skip
    t = time.perf_counter()
    alone = [run(plain, family, i) for i in range(len(problems))]
    alone_s = time.perf_counter() - t
    plain.close()
    for unified in (True, False):
        spec = {"artifact": "tiny", "options": {"threads": args.threads, "kv_unified": unified}}
        inner, _ = open_engine(spec, max_rows=rows, max_tokens=max_tokens)
        batched = BatchedEngine(inner)
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            together = list(pool.map(run, [batched] * len(problems), [family] * len(problems), range(len(problems))))
        shared_s = time.perf_counter() - t
        a, b = batched.scheduler.step_fit()
        batched.close()
        pairs = [(x.text, y.text) for p, q in zip(alone, together) for x, y in zip(p.rows, q.rows)]
        print(json.dumps({
            "kv": "unified" if unified else "stream per row", "requests": len(problems), "n": args.n,
            "rows_in_batch": rows, "one_by_one_s": round(alone_s, 3), "shared_batch_s": round(shared_s, 3),
            "ratio_shared_vs_one_by_one": round(shared_s / alone_s, 3),
            "rows_identical": sum(x == y for x, y in pairs), "rows": len(pairs),
            "step_s": round(a, 6), "per_token_s": round(b, 6),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
