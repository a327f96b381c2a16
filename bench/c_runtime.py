"""Benchmark: majority of 8 at a thinking budget of 128 tokens, the runtime in C against the Python runtime.

    python bench/c_runtime.py [--questions 80] [--threads 1] [--batched-bench PATH] [--model GGUF]

A config with one point (the tiny model, ``majority``, n 8, budget 128) is built with
``edgetts build-c``.  Each of the hardest ``arith`` questions (level 5, the longest reasoning)
goes to one running ``edgetts-answer --point`` (the C runtime; its own ``latency_ms``, measured
from the start of the strategy) and then to the Python strategy on the Python llama.cpp engine
(``trace.wall_s``, measured the same way): alternated question by question, so load on the
machine hits both alike.  The same seed and context sizes make
the rows token for token the same on both sides (checked: the generated tokens must match),
so both do exactly the same decoding work and the ratio is total C time over total Python
time.  Model loading is outside both measurements.

``--batched-bench PATH`` also runs llama.cpp's ``llama-batched-bench`` (8 sequences, 128
tokens each; built from llama.cpp's sources, none ships with edgetts) and reports
``ratio_vs_native``: the C runtime's seconds per generated token over the native tool's.
Rows of the C runtime end on their own, so that ratio compares per-token costs, not equal shapes.

``--model`` runs another GGUF instead of the tiny model, such as the ``qwen3-0.6b`` stand-in
(151,936-token vocabulary, where sampling costs most; its text is noise, so rows run to their
budget).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgetts.engines import SamplingParams, open_engine  # noqa: E402
from edgetts.export.build_c import build_c  # noqa: E402
from edgetts.models import BUILTIN  # noqa: E402
from edgetts.pareto.config import SCHEMA, write_config  # noqa: E402
from edgetts.strategies import RunConfig, create  # noqa: E402
from edgetts.tasks.datasets import load_dataset  # noqa: E402

N, BUDGET, SEED = 8, 128, 0


def config(folder: Path, model: str = "tiny") -> Path:
    name = Path(model).stem if model != "tiny" else "tiny"
    point = {"id": f"{name}/majority/n8/b128", "model": model, "artifact": model, "engine": "llama.cpp",
             "strategy": "majority", "n": N, "budget": BUDGET, "latency_ms": 100.0, "latency_quantiles_ms": {},
             "accuracy": 0.5, "accuracy_ci95": [0.4, 0.6]}  # fmt: skip
    cfg = {"schema": SCHEMA, "device": {}, "task": {"dataset": "arith"}, "constraints": {},
           "objective": {"maximize": "accuracy", "latency_quantile": "p95"}, "frontier": [point]}  # fmt: skip
    return write_config(cfg, folder / "bench.json")


def start_c(binary: Path, cfg: Path, threads: int) -> subprocess.Popen:
    return subprocess.Popen([str(binary), "--config", str(cfg), "--point", "0", "--seed", str(SEED), "--threads",
                             str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip


def ask_c(proc: subprocess.Popen, question: str) -> dict:
    proc.stdin.write(question + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batched-bench", default=None)
    ap.add_argument("--model", default="tiny", help="a GGUF (default: the tiny model), e.g. the qwen3-0.6b stand-in")
    args = ap.parse_args()
    model = args.model if args.model == "tiny" else str(Path(args.model).resolve())

    hard = [e.question for e in load_dataset("arith", seed=0) if e.level == 5][: args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp), model)
        binary = build_c(cfg, Path(tmp) / "build")["binary"]
        engine, family = open_engine({"engine": "llama.cpp", "artifact": model, "options": {"threads": args.threads}},
                                     max_rows=N, max_tokens=BUDGET + RunConfig().answer_tokens)  # fmt: skip
        proc = start_c(binary, cfg, args.threads)
        c_ms = py_ms = 0.0
        c_tokens = py_tokens = 0
        for q in hard:  # alternated question by question, so load on the machine hits both alike
            r = ask_c(proc, q)
            c_ms += r["latency_ms"]
            c_tokens += r["generated_tokens"]
            cfg_run = RunConfig(n=N, budget=BUDGET, sampling=SamplingParams(seed=SEED))
            trace = create("majority", engine, family, cfg_run).run(q)
            py_ms += 1000 * trace.wall_s
            py_tokens += trace.generated_tokens
        proc.stdin.close()
        proc.wait()
        engine.close()
    if c_tokens != py_tokens:
        raise SystemExit(f"the two runtimes decoded different rows ({c_tokens} vs {py_tokens} tokens)")
    result = {
        "bench": "c_runtime", "model": model, "strategy": "majority", "n": N, "budget": BUDGET,
        "questions": len(hard),
        "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "generated_tokens": c_tokens, "c_ms_per_question": round(c_ms / len(hard), 2),
        "python_ms_per_question": round(py_ms / len(hard), 2), "ratio_vs_python": round(c_ms / py_ms, 3),
    }  # fmt: skip
    print(f"C runtime:      {result['c_ms_per_question']:.1f} ms per question")
    print(f"Python runtime: {result['python_ms_per_question']:.1f} ms per question ({c_tokens} tokens each side)")
    if args.batched_bench:
        from parallel_sampling import TOKENS, batched_bench  # llama-batched-bench: 8 rows of 128 tokens
        from parallel_sampling import N as NATIVE_ROWS

        path = str(BUILTIN["tiny"]) if model == "tiny" else model
        native = batched_bench(args.batched_bench, path, 40, args.threads) / (NATIVE_ROWS * TOKENS)
        result["ratio_vs_native"] = round((c_ms / 1000 / c_tokens) / native, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
