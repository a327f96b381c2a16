"""Benchmark: what the HTTP server adds to a request, against the same requests run in process.

    python bench/serve_overhead.py [--config runs/profile/pareto.json] [--requests 200] [--threads 2]

Builds the default profile's Pareto config if none is given, then runs one request mix
(arith questions, deadlines 50/100/300/1000 ms, one at a time) twice, alternating in blocks:
in process through :class:`edgetts.runtime.executor.Executor` (the policy picks, the strategy
runs), and through ``edgetts serve`` in its own process with the official ``openai`` client.
Prints one JSON line last with ``p50_ratio`` (server p50 latency / in-process p50 latency).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_load import default_config, serve_threads, start_edgetts

from edgetts.runtime import Policy
from edgetts.runtime.executor import Executor, Request
from edgetts.tasks.datasets import load_dataset

DEADLINES = (50, 100, 300, 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument(
        "--threads",
        type=int,
        default=serve_threads(),
        help="llama.cpp threads on both sides (the server's default: all cores but one)",
    )
    args = ap.parse_args()
    config = args.config or default_config(Path("runs/serve-bench-profile"))
    questions = [ex.question for ex in load_dataset("arith", limit=50, seed=1)]
    mix = [(questions[i % len(questions)], DEADLINES[i % len(DEADLINES)]) for i in range(args.requests)]

    import openai

    proc, url = start_edgetts(config, args.threads, max_queue=None)  # the server's own queue limit
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    policy = Policy.load(config)
    executor = Executor(policy, threads=args.threads)
    for point in policy.frontier:  # engines open before timing, as the server opens its own at start
        executor.engine(point)
    local, remote, refused = [], [], 0
    try:
        for start in range(0, len(mix), 20):
            block = mix[start : start + 20]
            for q, d in block:
                t = time.perf_counter()
                req = Request(q, deadline_ms=d, arrived=t)
                executor.run(req, executor.plan(req))
                local.append(1000 * (time.perf_counter() - t))
            for q, d in block:
                t = time.perf_counter()
                try:
                    client.completions.create(model="edgetts", prompt=q, extra_body={"deadline_ms": d})
                except openai.RateLimitError:  # refused at admission: not an answer, not a latency
                    refused += 1
                    continue
                remote.append(1000 * (time.perf_counter() - t))
    finally:
        proc.terminate()
        proc.wait(10)
        executor.close()
    result = {"requests": len(mix), "deadlines_ms": DEADLINES, "threads": args.threads,
              "in_process_p50_ms": round(median(local), 3), "server_p50_ms": round(median(remote), 3),
              "refused": refused, "p50_ratio": round(median(remote) / median(local), 3)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
