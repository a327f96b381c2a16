"""Benchmark: a mean budget per request held by a price on compute (:mod:`edgetts.runtime.pricing`).

    python bench/price.py [--limit 500] [--profile DIR] [--requests 2000]

1. A pooled profile of the tiny model on ``--limit`` arith problems with the default grid
   (or ``--profile DIR``); its problems are split in two halves by a seeded shuffle: the
   Pareto config is built from the first half's records only, the other half is held out.
2. Held-out problems arrive one after another (``--requests`` of them, drawn with replacement,
   seeded); for each, the policy picks a point at a deadline no point misses, with the price a
   :class:`~edgetts.runtime.pricing.MeanBudget` sets, and the request costs what that point's
   record for that problem measured (its latency; correct or not as recorded).  Budgets: three
   means between the fastest and the slowest frontier point's held-out mean latency.
3. Per budget: the achieved mean against the budget, and the accuracy against the most accurate
   single static point whose held-out mean fits the budget.

The last line is one JSON object with ``mean_budget_error`` (worst |achieved - budget| / budget)
and ``accuracy_vs_static_at_budget`` (worst, in points).  Not here yet: the served half of the
price (a load-aware price in ``edgetts serve`` against price 0 at several loads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetts.pareto.config import frontier
from edgetts.profiling.records import RecordLog
from edgetts.profiling.summary import summarize
from edgetts.runtime import Policy
from edgetts.runtime.pricing import MeanBudget


def config_from(records: dict, base: dict) -> dict:
    """A Pareto config from ``records`` (the selection half), in the shape of the profile's own."""
    cells = summarize(records)["cells"]
    points = []
    for c in cells:
        ms = 1000 * c["latency_s"]["p95"]
        points.append({"id": f"{c['strategy']}/n{c['n']}/b{c['budget']}", "model": c["model"], "artifact": "tiny",
                       "engine": "llama.cpp", "strategy": c["strategy"], "n": c["n"], "budget": c["budget"],
                       "latency_ms": ms, "latency_quantiles_ms": {"p50": 1000 * c["latency_s"]["p50"]},
                       "accuracy": c["accuracy"], "accuracy_ci95": c["accuracy_ci95"],
                       "tokens": c["tokens"]["generated"]})  # fmt: skip
    return {**base, "frontier": frontier(points)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--profile")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prof = Path(args.profile or tempfile.mkdtemp(prefix="price-") + "/profile")
    if not args.profile:
        subprocess.run([sys.executable, "-m", "edgetts", "profile", "--limit", str(args.limit), "--out", str(prof),
                        "--quiet"], check=True)  # fmt: skip
    records = RecordLog(prof / "records.jsonl").load()
    problems = sorted({r["problem"] for r in records.values()})
    rng = random.Random(args.seed)
    rng.shuffle(problems)
    chosen, held = set(problems[: len(problems) // 2]), problems[len(problems) // 2 :]
    base = json.loads((prof / "pareto.json").read_text())
    config = config_from({k: r for k, r in records.items() if r["problem"] in chosen}, base)
    policy = Policy(config)
    front = policy.frontier
    by = {(r["strategy"], r["n"], r["budget"], r["problem"]): r for r in records.values() if r["repeat"] == 0}

    def held_mean(p, field):
        return mean(by[p["strategy"], p["n"], p["budget"], q][field] for q in held)

    means = [1000 * held_mean(p, "latency_s") for p in front]
    lo, hi = min(means), max(means)
    budgets = [lo + (hi - lo) * f for f in (0.25, 0.5, 0.75)]
    roomy = 10 * max(p["latency_ms"] for p in front)
    results = []
    for budget in budgets:
        ctl = MeanBudget(budget)
        costs, correct = [], []
        for _ in range(args.requests):
            q = rng.choice(held)
            p = policy.select(roomy, price=ctl.price).point
            rec = by[p["strategy"], p["n"], p["budget"], q]
            costs.append(1000 * rec["latency_s"])
            correct.append(rec["correct"])
            ctl.observe(costs[-1])
        fits = [(held_mean(p, "correct"), m) for p, m in zip(front, means) if m <= budget]
        static = max(fits)[0] if fits else None
        r = {"budget_ms": round(budget, 2), "achieved_ms": round(mean(costs), 2),
             "error": round(abs(mean(costs) - budget) / budget, 4), "accuracy": round(mean(correct), 4),
             "static_accuracy": None if static is None else round(static, 4),
             "vs_static_points": None if static is None else round(100 * (mean(correct) - static), 2),
             "final_price": ctl.price}  # fmt: skip
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    out = {
        "mean_budget_error": max(r["error"] for r in results),
        "accuracy_vs_static_at_budget": min(r["vs_static_points"] for r in results
                                            if r["vs_static_points"] is not None),
        "budgets": results, "held_out_problems": len(held), "requests_per_budget": args.requests,
        "frontier": [p["id"] for p in front],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
