"""Benchmark: memory planning and per-step cost on a Qwen3-0.6B-shaped stand-in (151,936-token vocabulary).

    python bench/standin.py [--model PATH] [--threads 1] [--rows 1,4,8,16] [--budgets 256,1024]
        [--reps 3] [--layouts unified,split] [--batched-bench PATH] [--llama-server PATH] [--skip-memory]
        [--skip-speed]

Without ``--model`` it writes the ``qwen3-0.6b`` stand-in (``edgetts standin``) and quantizes it
to Q4_K_M with ``edgetts quantize``, into ``$EDGETTS_CACHE/standins`` (default
``~/.cache/edgetts/standins``), once.

Memory: for every layout x n x budget, a fresh process opens the engine exactly as ``open_engine``
sizes it (n rows of budget + 32 answer tokens after a 512-token prompt reserve; ``unified``: one
cache, as run and profile open it; ``split``: a stream per row with its own copy of the prompt
reserve, each stream padded to 256 cells, as serve opens it), decodes 8 tokens on
every row, and reports its peak resident memory above what the process held before loading;
llama.cpp's own log gives the KV buffer it allocated.  The prediction is
:func:`edgetts.engines.memory.plan_memory` from the GGUF header.  ``kv_memory_error`` compares
the KV part: predicted growth against measured peak growth between each point and the
smallest context of the same layout (same model, same process recipe, so weights and compute cancel out; the
per-row logit buffers that grow with n are part of the prediction); the
largest relative error over the points is reported (target within 0.10).  ``total_error`` is
the same comparison for the whole plan against the whole measured peak: the plan counts what
llama.cpp allocates, the peak only pages that were touched, so the plan is an upper bound.

Serve rows (every run, from the header alone): the rows ``edgetts serve`` opens by default for a
config of this model at the largest ``--budgets`` value, on the memory free now and under
``--memory-mb 2000``, with the plan of their cache.

Per-step cost: 8 rows x 128 tokens (end of sequence masked) through ``engine.sample`` against a
bare loop over the same context (one ``llama_decode`` per step, the same native samplers, nothing
else), and ``engine.sample`` with log-probabilities on (``logprobs=0``, as the
confidence-weighted strategies ask for them), ``--reps`` times in a rotating order.  Ratios are
of median step times (sample every row, then decode), which a step stalled by another process
does not move: ``ratio_vs_bare_loop`` and ``logprobs_overhead`` (against off, target at most
0.05); call totals are reported too.  ``--batched-bench`` and ``--llama-server`` add llama.cpp's
own binaries for the same shape (see ``bench/parallel_sampling.py``; targets at most 1.05x and 1.0x).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from edgetts.engines import EngineSpec, SamplingParams, open_engine  # noqa: E402
from edgetts.engines.memory import MB, gguf_info, plan_memory  # noqa: E402
from edgetts.engines.spec import ContextPlan  # noqa: E402

ROWS, TOKENS, ANSWER = 8, 128, 32
PROMPT = "<|im_start|>user\nEvaluate left to right: 47+38*3-59<|im_end|>\n<|im_start|>assistant\n"


def standin_model() -> Path:
    from edgetts.models.standin import cache_dir

    folder = cache_dir() / "standins"
    q4 = folder / "qwen3-0.6b-q4_k_m.gguf"
    if not q4.is_file():
        f16 = folder / "qwen3-0.6b-f16.gguf"
        if not f16.is_file():
            subprocess.run([sys.executable, "-m", "edgetts", "standin", "--shape", "qwen3-0.6b", "--out", str(f16)],
                           check=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "edgetts", "quantize", str(f16), "--to", "q4_k_m", "--out",
                        str(folder / "q")], check=True)  # fmt: skip
        (folder / "q" / "qwen3-0.6b-q4_k_m.gguf").rename(q4)
    return q4


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")) / MB


def child_memory(model: str, rows: int, budget: int, threads: int, unified: bool) -> None:
    """One point, in its own process: peak memory above the pre-load baseline, and llama.cpp's KV log line."""
    import llama_cpp  # noqa: F401 - loaded before the baseline, like the engine's own imports

    from edgetts.engines.llamacpp import LlamaCppEngine

    plan = ContextPlan(rows, budget + ANSWER)
    base = _status("VmRSS")
    log, sys.stderr = sys.stderr, io.StringIO()
    try:
        engine = LlamaCppEngine(model, n_ctx=plan.n_ctx if unified else plan.split_n_ctx, n_threads=threads,
                                max_rows=rows, verbose=True, kv_unified=unified)  # fmt: skip
        text = sys.stderr.getvalue()
    finally:
        sys.stderr = log
    engine.sample(PROMPT, rows, SamplingParams(max_tokens=8, ignore_eos=True))
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", text)
    print(json.dumps({"peak_mb": _status("VmHWM") - base, "kv_log_mb": float(kv.group(1)) if kv else None,
                      "n_ctx": engine.n_ctx}))  # fmt: skip
    engine.close()


def memory(model: str, rows: list[int], budgets: list[int], threads: int, layouts: list[str]) -> dict:
    info = gguf_info(model)

    def measure(n, b, layout):
        out = subprocess.run([sys.executable, __file__, "--child-memory", model, str(n), str(b), str(threads),
                              layout], capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    def planned(n, tokens, layout):
        plan = ContextPlan(n, tokens)
        if layout == "unified":
            return plan_memory(info, plan.n_ctx, n)
        return plan_memory(info, plan.split_n_ctx, n, kv_unified=False)  # a stream per row, as serve runs

    points = []
    for layout in layouts:
        base_plan, base = planned(1, 1, layout), measure(1, 1 - ANSWER, layout)
        points += _layout_points(layout, rows, budgets, base_plan, base, planned, measure)
    big = [p for p in points if p["kv_growth_measured_mb"] > 8]  # below that, allocator noise dominates
    return {"points": points, "kv_memory_error": max((p["kv_error"] for p in big), default=None),
            "kv_log_error": max((abs(p["predicted_kv_mb"] - p["kv_log_mb"]) / p["kv_log_mb"] for p in points
                                 if p["kv_log_mb"]), default=None),  # points whose log had no KV line are left out
            "total_error_max": max(p["total_error"] for p in points),
            "total_error_min": min(p["total_error"] for p in points)}  # fmt: skip


def _layout_points(layout, rows, budgets, base_plan, base, planned, measure) -> list[dict]:
    points = []
    for n in rows:
        for b in budgets:
            plan = planned(n, b + ANSWER, layout)
            m = measure(n, b, layout)
            grown = m["peak_mb"] - base["peak_mb"]
            predicted = (plan.total - base_plan.total) / MB  # the cache, and the per-row output buffers
            p = {"layout": layout, "n": n, "budget": b, "n_ctx": plan.n_ctx, "measured_n_ctx": m["n_ctx"],
                 "predicted_kv_mb": round(plan.kv / MB, 1), "kv_log_mb": m["kv_log_mb"],
                 "predicted_total_mb": round(plan.total_mb, 1), "measured_peak_mb": round(m["peak_mb"], 1),
                 "kv_growth_predicted_mb": round(predicted, 1), "kv_growth_measured_mb": round(grown, 1),
                 "kv_error": round(abs(predicted - grown) / max(grown, 1e-9), 4),
                 "total_error": round((plan.total_mb - m["peak_mb"]) / m["peak_mb"], 4)}  # fmt: skip
            points.append(p)
            print(f"{layout:7s} n={n:2d} b={b:4d}: KV predicted {p['predicted_kv_mb']} MB "
                  f"(llama.cpp {p['kv_log_mb']}), growth "
                  f"{p['kv_growth_predicted_mb']} vs {p['kv_growth_measured_mb']} measured; plan "
                  f"{p['predicted_total_mb']} vs peak {p['measured_peak_mb']} MB", file=sys.stderr)  # fmt: skip
    return points


def serve_rows(model: str, budget: int, threads: int, caps: list[float | None]) -> dict:
    """The rows ``edgetts serve`` opens by default for a config of this model whose widest budget is
    ``budget`` (:func:`edgetts.runtime.executor.rows_that_fit`, a stream per row), with the cache
    they plan: free memory first, then under each ``--memory-mb`` in ``caps``."""
    from edgetts.runtime.executor import HEADROOM, rows_that_fit

    spec = EngineSpec.from_dict({"engine": "llama.cpp", "artifact": model})
    spec = spec.with_options(threads=threads, kv_unified=False)
    out = {}
    for cap in caps:  # 64: serve's ceiling, max(64, 8 x the widest n), for configs up to n 8
        rows = rows_that_fit([spec], 64, budget + ANSWER, cap, HEADROOM)
        plan = plan_memory(gguf_info(model), ContextPlan(max(rows, 1), budget + ANSWER).split_n_ctx, max(rows, 1),
                           kv_unified=False)  # fmt: skip
        out["free" if cap is None else f"memory_mb={cap:g}"] = {"rows": rows, "kv_mb": round(plan.kv / MB),
                                                                 "total_mb": round(plan.total_mb)}  # fmt: skip
        print(f"serve at budget {budget}, {'free memory' if cap is None else f'--memory-mb {cap:g}'}: {rows} rows, "
              f"cache {plan.kv / MB:.0f} MiB of {plan.total_mb:.0f} MiB planned", file=sys.stderr)  # fmt: skip
    return out


def bare_loop(engine, prompt: str, n: int, tokens: int) -> tuple[float, list[float]]:
    """llama.cpp's loop with nothing around it: prefill, share, then decode + native sampling per step.

    Returns the call's seconds and the seconds of each step (sample every row, then decode)."""
    lc = engine.lc
    t = time.perf_counter()
    marks = []
    ptoks = engine.tokenize(prompt, add_bos=engine.add_bos)
    lc.llama_memory_clear(engine.mem, True)
    engine._decode([(tok, i, 0, i == len(ptoks) - 1) for i, tok in enumerate(ptoks)])
    for s in range(1, n):
        lc.llama_memory_seq_cp(engine.mem, 0, s, -1, -1)
    samplers = [engine._sampler(SamplingParams(ignore_eos=True), s) for s in range(n)]
    idx = [-1] * n
    for step in range(tokens):
        toks = [lc.llama_sampler_sample(samplers[r], engine.ctx, idx[r]) for r in range(n)]
        marks.append(time.perf_counter())
        if step == tokens - 1:
            break
        engine._decode([(tok, len(ptoks) + step, r, True) for r, tok in enumerate(toks)])
        idx = list(range(n))
    for s in samplers:
        lc.llama_sampler_free(s)
    return time.perf_counter() - t, [b - a for a, b in itertools.pairwise(marks)]


def speed(model: str, threads: int, reps: int) -> dict:
    engine, _ = open_engine(EngineSpec("llama.cpp", model, options={"threads": threads}), max_rows=ROWS,
                            max_tokens=TOKENS)  # fmt: skip

    def ours(logprobs):
        t = time.perf_counter()
        res = engine.sample(PROMPT, ROWS, SamplingParams(max_tokens=TOKENS, ignore_eos=True, logprobs=logprobs))
        assert all(r.n_generated == TOKENS for r in res.rows)
        times = res.rows[-1].times  # the last row is sampled last: its marks bracket whole steps
        return time.perf_counter() - t, [b - a for a, b in itertools.pairwise(times)]

    runs = {"engine": lambda: ours(None), "bare": lambda: bare_loop(engine, PROMPT, ROWS, TOKENS),
            "logprobs": lambda: ours(0)}  # fmt: skip
    for f in runs.values():  # warm-up
        f()
    total = {k: 0.0 for k in runs}
    steps: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for rep in range(reps):  # the order rotates, so a load swing does not always hit the same side
        for k in names[rep % 3 :] + names[: rep % 3]:
            t, st = runs[k]()
            total[k] += t
            steps[k] += st
    med = {k: statistics.median(v) for k, v in steps.items()}  # robust to steps stalled by other processes
    out = {"engine_s": round(total["engine"] / reps, 4), "bare_loop_s": round(total["bare"] / reps, 4),
           "logprobs_s": round(total["logprobs"] / reps, 4),
           "ratio_vs_bare_loop": round(med["engine"] / med["bare"], 3),
           "logprobs_overhead": round(med["logprobs"] / med["engine"] - 1, 3),
           "step_ms": round(1000 * med["engine"], 2), "bare_step_ms": round(1000 * med["bare"], 2),
           "logprobs_step_ms": round(1000 * med["logprobs"], 2),
           "prompt_tokens": engine.count_tokens(PROMPT)}  # fmt: skip
    engine.close()
    return out


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child-memory":
        child_memory(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "unified")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--budgets", default="256,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batched-bench")
    ap.add_argument("--llama-server")
    ap.add_argument("--layouts", default="unified,split", help="KV layouts: unified (run, profile), split (serve)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    model = args.model or str(standin_model())
    result = {"model": model, "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load": round(os.getloadavg()[0], 2)}  # fmt: skip
    result["serve_rows"] = serve_rows(model, max(int(v) for v in args.budgets.split(",")), args.threads, [None, 2000])
    if not args.skip_memory:
        result["memory"] = memory(model, [int(v) for v in args.rows.split(",")],
                                  [int(v) for v in args.budgets.split(",")], args.threads,
                                  args.layouts.split(","))  # fmt: skip
        result["kv_memory_error"] = result["memory"]["kv_memory_error"]
    if not args.skip_speed:
        result["speed"] = speed(model, args.threads, args.reps)
        print(f"per step {result['speed']['step_ms']} ms; x{result['speed']['ratio_vs_bare_loop']} the bare loop; "
              f"log-probs +{100 * result['speed']['logprobs_overhead']:.1f}%", file=sys.stderr)  # fmt: skip
        from parallel_sampling import batched_bench, llama_server

        engine_s = result["speed"]["engine_s"]
        if args.batched_bench:
            native = batched_bench(args.batched_bench, model, result["speed"]["prompt_tokens"] + 1, args.threads)
            result["speed"]["native_s"] = round(native, 4)
            result["speed"]["ratio_vs_native"] = round(engine_s / native, 3)
        if args.llama_server:
            server = llama_server(args.llama_server, model, PROMPT, args.threads, args.reps) / args.reps
            result["speed"]["server_s"] = round(server, 4)
            result["speed"]["ratio_vs_llama_server"] = round(engine_s / server, 3)
    result["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
