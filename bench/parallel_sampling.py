"""Benchmark: 8 samples of one prompt through the batched primitive vs 8 sequential completions.

    python bench/parallel_sampling.py [--model PATH] [--reps 5] [--threads 2]
        [--llama-server PATH] [--batched-bench PATH]

Both sides use the same GGUF, threads, sampling (temperature 1, no truncation) and a
budget of exactly 128 new tokens per sample (end of sequence is masked so every sample has
the same length).  The two are alternated ``--reps`` times in one process, so machine noise
hits both alike; the ratio is total batched time over total sequential time.

``--llama-server PATH`` also starts that llama-server binary with 8 parallel slots and sends
the 8 requests concurrently (``ratio_vs_llama_server``); ``--batched-bench PATH`` runs
llama.cpp's ``llama-batched-bench`` for the same shape (``ratio_vs_native``).  Such binaries
are built from llama.cpp's sources; none ships with edgetts.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgetts.engines import EngineSpec, SamplingParams, open_engine  # noqa: E402
from edgetts.models import BUILTIN  # noqa: E402
from edgetts.models.families import FAMILIES  # noqa: E402
from edgetts.tasks import arith  # noqa: E402

N, TOKENS = 8, 128


def sequential(llm, prompt: str, eos: int) -> float:
    t = time.perf_counter()
    for i in range(N):
        out = llm.create_completion(
            prompt, max_tokens=TOKENS, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=i,
            logit_bias={eos: float("-inf")},
        )  # fmt: skip
        assert out["choices"][0]["finish_reason"] == "length"
    return time.perf_counter() - t


def batched(engine, prompt: str) -> float:
    t = time.perf_counter()
    res = engine.sample(prompt, N, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    assert all(r.n_generated == TOKENS for r in res.rows)
    return time.perf_counter() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(binary: str, model: str, prompt: str, threads: int, reps: int) -> float:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [binary, "-m", model, "--port", str(port), "-np", str(N), "-c", str(N * 512), "-t", str(threads),
         "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)

        def one(i):
            body = {"prompt": prompt, "n_predict": TOKENS, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "min_p": 0.0, "seed": i, "ignore_eos": True, "cache_prompt": True}  # fmt: skip
            req = urllib.request.Request(
                url + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())

        times = []
        with ThreadPoolExecutor(N) as pool:
            for _ in range(reps + 1):
                t = time.perf_counter()
                list(pool.map(one, range(N)))
                times.append(time.perf_counter() - t)
        return sum(times[1:])  # the first round warms the server up
    finally:
        proc.terminate()
        proc.wait(10)


def batched_bench(binary: str, model: str, prompt_tokens: int, threads: int) -> float:
    out = subprocess.run(
        [binary, "-m", model, "-c", str(N * 512), "-b", "512", "-ub", "512", "-npp", str(prompt_tokens),
         "-ntg", str(TOKENS), "-npl", str(N), "-pps", "-t", str(threads)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # Table row: |  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in (out.stdout + out.stderr).splitlines():  # the table goes to either stream by version
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]) and int(cells[2]) == N:
            return float(cells[8])
    raise RuntimeError("could not read llama-batched-bench output:\n" + out.stdout[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(BUILTIN["tiny"]))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-server")
    ap.add_argument("--batched-bench")
    args = ap.parse_args()

    import llama_cpp

    fam = FAMILIES["tiny"]
    prompt = fam.prompt_template.format(question=arith.eval_split()[-1].question)
    engine, _ = open_engine(EngineSpec("llama.cpp", args.model, options={"threads": args.threads}), max_rows=N,
                            max_tokens=TOKENS)  # fmt: skip
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=512, n_threads=args.threads, verbose=False)
    eos = llm.token_eos()
    batched(engine, prompt), sequential(llm, prompt, eos)  # warm-up
    tb = ts = 0.0
    for _ in range(args.reps):
        tb += batched(engine, prompt)
        ts += sequential(llm, prompt, eos)
    result = {
        "model": args.model,
        "n": N,
        "tokens": TOKENS,
        "reps": args.reps,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "batched_s": round(tb / args.reps, 4),
        "sequential_s": round(ts / args.reps, 4),
        "ratio_vs_sequential": round(tb / ts, 3),
        "batched_tokens_per_s": round(N * TOKENS * args.reps / tb, 1),
    }
    print(f"batched {result['batched_s']}s vs sequential {result['sequential_s']}s per 8x{TOKENS}", file=sys.stderr)
    if args.llama_server:
        t_server = llama_server(args.llama_server, args.model, prompt, args.threads, args.reps)
        result["llama_server_s"] = round(t_server / args.reps, 4)
        result["ratio_vs_llama_server"] = round(tb / t_server, 3)
    if args.batched_bench:
        t_native = batched_bench(args.batched_bench, args.model, engine.count_tokens(prompt) + 1, args.threads)
        result["native_s"] = round(t_native, 4)
        result["ratio_vs_native"] = round((tb / args.reps) / t_native, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
