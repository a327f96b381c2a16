"""Benchmark: `edgetts serve` in front of a batching server sends it requests at once, as clients do.

    python bench/serve_upstream.py --llama-server PATH [--requests 16] [--budget 64] [--threads 1] [--reps 3]

The upstream is llama.cpp's own ``llama-server`` (``-np`` slots = ``--requests``: it decodes the
requests it holds at once) on the tiny model.  ``--requests`` concurrent clients each ask one
question three ways, ``--reps`` times in a rotating order:

* **direct**: one completion straight to the upstream, ``max_tokens`` = the thinking budget plus
  the answer room (what a client without edgetts would send);
* **edgetts serve**: a config whose one point is ``single`` n 1 on the ``openai-http`` engine at
  that upstream (its default ``concurrency`` of 16): each request becomes the engine's rounds (the
  reasoning to its budget, then the forced answer), sent as they come;
* **edgetts serve, concurrency 1**: the same point with the engine's ``concurrency`` option 1: one
  call at a time, as ``serve`` called a server before it let calls through concurrently.

Reported per way: the median wall seconds for all the requests, and the upstream's own
``/metrics``-free view, its requests served.  ``ratio_vs_direct`` is edgetts serve's seconds over
direct's (a round more per request, so somewhat above 1), ``serial_over_concurrent`` concurrency
1's over edgetts serve's (about ``--requests`` when the upstream batches and edgetts lets it).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from parallel_sampling import free_port  # noqa: E402
from serve_load import serve_threads, start_edgetts, wait_up  # noqa: E402

from edgetts.models import BUILTIN  # noqa: E402
from edgetts.models.families import FAMILIES  # noqa: E402
from edgetts.strategies import RunConfig  # noqa: E402
from edgetts.tasks.datasets import load_dataset  # noqa: E402

SHIPPED = ROOT / "profiles" / "tiny-epyc-2core" / "pareto.json"


def config_for(url: str, budget: int, concurrency: int | None, out: Path) -> Path:
    """The shipped config reduced to one point: single, n 1, ``budget``, on openai-http at ``url``."""
    base = json.loads(SHIPPED.read_text())
    point = dict(base["frontier"][0], id=f"upstream/single/n1/b{budget}", engine="openai-http", artifact="tiny",
                 url=url, engine_options={"concurrency": concurrency} if concurrency else {}, strategy="single",
                 n=1, budget=budget, latency_ms=1000.0, latency_quantiles_ms={"p50": 1000.0},
                 profiled_with={})  # fmt: skip
    out.write_text(json.dumps({**base, "frontier": [point]}))
    return out


async def burst(post, questions) -> float:
    t0 = time.perf_counter()
    codes = await asyncio.gather(*(post(q) for q in questions))
    if any(c != 200 for c in codes):
        raise SystemExit(f"a request failed: {sorted(set(codes))}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--threads", type=int, default=serve_threads())
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    fam = FAMILIES["tiny"]
    questions = [e.question for e in load_dataset("arith", limit=args.requests, seed=4)]
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="serve-upstream-"))
    up = subprocess.Popen([args.llama_server, "-m", str(BUILTIN["tiny"]), "--port", str(port), "-np",
                           str(args.requests), "-t", str(args.threads), "-c", str(args.requests * 512)],
                          stdout=subprocess.DEVNULL, stderr=(log / "llama-server.log").open("wb"))  # fmt: skip
    upstream = f"http://127.0.0.1:{port}"
    servers = {}
    try:
        wait_up(upstream + "/health", up, log / "llama-server.log")
        for name, conc in (("edgetts serve", None), ("edgetts serve, concurrency 1", 1)):
            cfg = config_for(upstream + "/v1", args.budget, conc, log / f"{conc or 'default'}.json")
            servers[name] = start_edgetts(str(cfg), args.threads, max_queue=None)
        answer = RunConfig().answer_tokens

        async def run(way: str) -> float:
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=4 * args.requests)) as c:
                if way == "direct":
                    async def post(q):
                        r = await c.post(upstream + "/v1/completions", json={
                            "prompt": fam.prompt_template.format(question=q), "max_tokens": args.budget + answer,
                            "temperature": 1.0, "seed": 0})  # fmt: skip
                        return r.status_code
                else:
                    async def post(q):
                        r = await c.post(servers[way][1] + "/v1/completions",
                                         json={"prompt": q, "deadline_ms": 600_000})  # fmt: skip
                        return r.status_code
                return await burst(post, questions)

        ways = ["direct", "edgetts serve", "edgetts serve, concurrency 1"]
        seconds: dict[str, list[float]] = {w: [] for w in ways}
        for w in ways:  # warm up every path once
            asyncio.run(run(w))
        for rep in range(args.reps):
            for w in ways[rep % 3:] + ways[: rep % 3]:  # a rotating order: load drift hits every way alike
                seconds[w].append(asyncio.run(run(w)))
                print(json.dumps({"rep": rep, "way": w, "seconds": round(seconds[w][-1], 3)}), file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
        up.terminate()
        up.wait(10)
    med = {w: statistics.median(v) for w, v in seconds.items()}
    out = {"requests": args.requests, "budget": args.budget, "threads": args.threads,
           "median_s": {w: round(v, 3) for w, v in med.items()},
           "ratio_vs_direct": round(med["edgetts serve"] / med["direct"], 3),
           "serial_over_concurrent": round(med["edgetts serve, concurrency 1"] / med["edgetts serve"], 3),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
