"""Benchmark: accuracy and generated tokens per strategy and thinking budget on the built-in benchmark.

    python bench/strategies.py [--budgets 32,64,128] [--n 8] [--limit 500] [--threads 2]

Every strategy runs every problem at every budget with the same seeds (row ``i`` uses seed
``i``), so comparisons between strategies are paired.  Options: ``adaptive`` and ``esc`` use
their defaults (start 4 / step 2 / threshold 0.95; window a quarter of n, at least 2), ``budget-forcing`` extends
once with "Wait", ``length-hint`` keeps its hard cap.

Strategy options go after a colon: ``--strategies "majority;esc:window=2"``.
Prints a table, then one JSON line with, at the largest budget, each early-stopping vote's
accuracy difference to majority-of-n and its share of majority's generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetts.engines import EngineSpec, open_engine
from edgetts.models.families import FAMILIES
from edgetts.strategies import STRATEGIES, RunConfig, create
from edgetts.tasks.datasets import load_dataset
from edgetts.tasks.grading import is_equivalent


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="32,64,128")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--strategies",
        default=";".join(STRATEGIES),
        help="';'-separated names, each optionally with options: 'esc:window=2;adaptive:start=2,step=1'",
    )
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    names = args.strategies.split(";")
    examples = load_dataset("arith", limit=args.limit, seed=0 if args.limit else None)
    fam = FAMILIES["tiny"]
    spec = EngineSpec("llama.cpp", "tiny", options={"threads": args.threads})
    engine, _ = open_engine(spec, max_rows=args.n, max_tokens=max(budgets) + RunConfig().answer_tokens)
    results = {}
    t_all = time.perf_counter()
    for budget in budgets:
        for name in names:
            base, _, opts = name.partition(":")  # e.g. "esc:window=2" or "adaptive:start=2,step=1"
            options = {k: _value(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
            strat = create(base, engine, fam, RunConfig(n=args.n, budget=budget), **options)
            correct = tokens = rows = 0
            t0 = time.perf_counter()
            for ex in examples:
                tr = strat.run(ex.question)
                correct += is_equivalent(tr.answer, ex.answer)
                tokens += tr.generated_tokens
                rows += tr.rows_used
            res = {
                "accuracy": correct / len(examples),
                "mean_tokens": tokens / len(examples),
                "mean_rows": rows / len(examples),
                "mean_ms": 1000 * (time.perf_counter() - t0) / len(examples),
            }
            results[(name, budget)] = res
            line = f"budget {budget:4d}  {name:15s} acc {100 * res['accuracy']:5.1f}%  "
            line += f"tokens {res['mean_tokens']:7.1f}  rows {res['mean_rows']:4.2f}  {res['mean_ms']:7.1f} ms/problem"
            print(line, file=sys.stderr, flush=True)
    top = max(budgets)
    maj = results.get(("majority", top))
    summary = {
        "problems": len(examples),
        "n": args.n,
        "budgets": budgets,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "seconds": round(time.perf_counter() - t_all, 1),
        "results": {f"{k[0]}@{k[1]}": {m: round(v, 4) for m, v in r.items()} for k, r in results.items()},
    }
    for name in names:
        if maj and name.split(":")[0] in ("adaptive", "esc"):
            r = results[(name, top)]
            summary[f"{name}_accuracy_minus_majority"] = round(r["accuracy"] - maj["accuracy"], 4)
            summary[f"{name}_token_share_of_majority"] = round(r["mean_tokens"] / maj["mean_tokens"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
