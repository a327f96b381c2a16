"""Benchmark: what measuring a query costs the query (:class:`~edgetts.telemetry.meters.QueryMeter`).

    python bench/meter_cost.py [--threads T ...] [--queries 30] [--reps 5]

The tiny model answers the same arith questions (majority, 4 rows, budget 64) three ways, the
ways taking turns rep after rep so that a machine whose speed drifts favours none:

* ``bare``: no meter;
* ``meter``: inside ``QueryMeter.measure()`` as ``edgetts profile`` runs it (on a machine with
  no power meter and no GPU, no thread: peak memory is the kernel's ``VmHWM``);
* ``sampler``: the same with the kernel's peak made unavailable, so the meter's thread samples
  memory 100 times a second beside the engine (as every query was measured before).

``--threads`` defaults to the product's own (all cores but one) and all cores; llama.cpp on
every core is where a thread beside it costs most.  The last line is one JSON object with, per
thread count, the mean ms per query of each way and ``meter_over_bare``, ``sampler_over_bare``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetts.engines import open_engine
from edgetts.engines.base import SamplingParams
from edgetts.engines.spec import serving_threads
from edgetts.strategies import RunConfig, create
from edgetts.tasks.datasets import load_dataset
from edgetts.telemetry import meters


def one_way(engine, family, questions, way: str) -> float:
    """Mean ms per query, measured the given way."""
    meter = meters.QueryMeter()
    reset = meters.reset_peak_rss
    if way == "sampler":
        meters.reset_peak_rss = lambda: False  # no kernel count: the thread samples memory
    try:
        times = []
        for q in questions:
            cfg = RunConfig(n=4, budget=64, sampling=SamplingParams(seed=0))
            t0 = time.perf_counter()
            if way == "bare":
                create("majority", engine, family, cfg).run(q)
            else:
                with meter.measure():
                    create("majority", engine, family, cfg).run(q)
            times.append(time.perf_counter() - t0)
        return 1000 * mean(times)
    finally:
        meters.reset_peak_rss = reset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="*", default=None)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    threads = args.threads or sorted({serving_threads() or 1, os.cpu_count() or 1})
    questions = [ex.question for ex in load_dataset("arith", limit=args.queries, seed=0)]
    out = {}
    for t in threads:
        engine, family = open_engine({"artifact": "tiny", "options": {"threads": t}}, max_rows=4, max_tokens=96)
        try:
            ways = ["bare", "meter", "sampler"]
            got: dict[str, list[float]] = {w: [] for w in ways}
            for rep in range(args.reps):
                for w in ways[rep % 3:] + ways[: rep % 3]:
                    got[w].append(one_way(engine, family, questions, w))
            row = {w: round(mean(v), 3) for w, v in got.items()}
            row.update(meter_over_bare=round(row["meter"] / row["bare"], 3),
                       sampler_over_bare=round(row["sampler"] / row["bare"], 3))  # fmt: skip
            print(json.dumps({"threads": t, **row}), file=sys.stderr)
            out[str(t)] = row
        finally:
            engine.close()
    print(json.dumps({"threads": out, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                      "load": round(os.getloadavg()[0], 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
