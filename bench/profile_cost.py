"""Benchmark: the cost and the fidelity of pooled profiling against direct profiling.

    python bench/profile_cost.py [--limit 100] [--threads T]

``--threads`` defaults to the product's own (all cores but one, or ``EDGETTS_THREADS``), the
setting ``edgetts profile`` runs with.

Profiles the tiny model twice in one process over the same grid (majority, esc and
first-finish x n 2, 4, 6, 8 x budgets 24, 48, 72, 96, on ``--limit`` arith problems): once
in pooled mode, once in direct mode, each into a fresh directory.  Prints a line per cell,
then one JSON line with

* ``pooled_over_direct``: wall time of the pooled profile over the direct one;
* ``cells_within_ci``: share of cells whose pooled and direct accuracies differ by at most
  1.96 standard errors of the difference (both estimates' errors counted: the direct one
  binomial, the pooled one from its per-problem expected correctness);
* ``latency_mape``: mean absolute percentage error of the pooled (modelled) mean latency
  against the direct measured mean latency, over cells.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, pstdev

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetts.engines.llamacpp import default_threads
from edgetts.engines.spec import serving_threads
from edgetts.profiling.config import SweepConfig
from edgetts.profiling.records import RecordLog
from edgetts.profiling.runner import run_profile


def by_cell(directory: Path) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = {}
    for rec in RecordLog(directory / "records.jsonl").load().values():
        cells.setdefault((rec["strategy"], rec["n"], rec["budget"]), []).append(rec)
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    # Default: the product's own (all cores but one, or EDGETTS_THREADS), as `edgetts profile` runs.
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    grid = {"limit": args.limit, "strategies": ["majority", "esc", "first-finish"], "n": [2, 4, 6, 8],
            "budgets": [24, 48, 72, 96], "warmup": 3}  # fmt: skip
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("pooled", "direct"):
            cfg = SweepConfig(mode=mode, **grid)
            cfg.engine.threads = args.threads  # None: the product's default
            t0 = time.perf_counter()
            run_profile(cfg, Path(tmp) / mode)
            walls[mode] = time.perf_counter() - t0
            print(f"{mode}: {walls[mode]:.1f} s", file=sys.stderr, flush=True)
        pooled, direct = by_cell(Path(tmp) / "pooled"), by_cell(Path(tmp) / "direct")
    within, errors = [], []
    for cell in sorted(direct):
        p = [r["correct"] for r in pooled[cell]]
        d = [r["correct"] for r in direct[cell]]
        pa, da = mean(p), mean(d)
        se = math.sqrt(pstdev(p) ** 2 / len(p) + da * (1 - da) / len(d))
        ok = abs(pa - da) <= 1.96 * se if se > 0 else pa == da
        within.append(ok)
        pl, dl = mean(r["latency_s"] for r in pooled[cell]), mean(r["latency_s"] for r in direct[cell])
        errors.append(abs(pl - dl) / dl)
        print(f"{cell[0]:12s} n={cell[1]} b={cell[2]:3d}  acc pooled {100 * pa:5.1f} direct {100 * da:5.1f} "
              f"{'ok ' if ok else 'OUT'}  latency pooled {1000 * pl:6.2f} ms direct {1000 * dl:6.2f} ms",
              file=sys.stderr)  # fmt: skip
    print(json.dumps({
        "problems": args.limit, "cells": len(within), "threads": args.threads or serving_threads() or default_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "pooled_s": round(walls["pooled"], 2), "direct_s": round(walls["direct"], 2),
        "pooled_over_direct": round(walls["pooled"] / walls["direct"], 4),
        "cells_within_ci": round(sum(within) / len(within), 4),
        "latency_mape": round(mean(errors), 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
