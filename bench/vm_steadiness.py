"""Benchmark: how steady this machine's speed is, which bounds what ``bench/calibrate.py`` can show.

    python bench/vm_steadiness.py [--seconds 20] [--processes 6]

1. A CPU-bound loop's rate, counted per second for ``--seconds``, bare and inside a cgroup v1 CPU
   quota of half a core (the ``bench/calibrate.py`` group) at a 2 ms and a 20 ms period: the mean
   slowdown against bare (2 where the quota costs nothing itself) and the spread of the
   one-second rates (max/min).
2. The same llama.cpp call (the tiny model, one row of 32 tokens, the median of 40 calls) on 2
   threads, ``bench/calibrate.py``'s ``threads=2`` setting, in ``--processes`` fresh processes one
   after another: whether the machine keeps one speed from process to process in that setting;
   and, in each process, the medians of four blocks of 30 more calls 1.5 s apart: whether it
   keeps one speed within a process (if a process's speed were its own, a calibration could
   average processes; if it moves within one, only time does).  The CPU time the hypervisor
   says it took from this VM meanwhile (``steal`` in ``/proc/stat``) is reported beside it.

The last line is one JSON object with ``quota`` (per period: ``slowdown``, ``spread``),
``call_ms`` (per process), ``blocks_ms`` (per process, the four blocks' medians) and
``steal_share`` (stolen over all CPU time while the calls ran).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate as cal

LOOP = """
import sys, time
t0 = time.perf_counter(); cur, count, rates = t0, 0, []
while time.perf_counter() - t0 < float(sys.argv[1]):
    s = 0
    for i in range(30000):
        s += i * i
    count += 1
    now = time.perf_counter()
    if now - cur >= 1:
        rates.append(count / (now - cur)); cur, count = now, 0
print(" ".join(map(str, rates)))
"""

CALL = """
import statistics, time
from edgetts.engines import EngineSpec, open_engine
from edgetts.engines.base import SamplingParams
spec = EngineSpec("llama.cpp", "tiny").resolved().with_options(threads=2)
engine, _ = open_engine(spec, max_rows=1, max_tokens=48)
def median_ms(calls):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        engine.sample("What is 12+35?", 1, SamplingParams(max_tokens=32, ignore_eos=True))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
print(median_ms(40))
blocks = []
for _ in range(4):
    time.sleep(1.5)
    blocks.append(median_ms(30))
print(" ".join(map(str, blocks)))
"""


def cpu_times() -> tuple[int, int]:
    """(stolen, all) CPU time of this machine so far, in clock ticks (``/proc/stat``'s first line)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return fields[7], sum(fields)


def loop_rates(seconds: float, period_us: int | None) -> list[float]:
    """One-second rates of the loop, inside a quota of half a core per ``period_us`` (None: bare)."""
    if period_us is not None:
        cal.make_quota(period_us)

    def enter():
        (cal.CGROUP / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run([sys.executable, "-c", LOOP, str(seconds)], capture_output=True, text=True, check=True,
                         preexec_fn=enter if period_us is not None else None)  # fmt: skip
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--processes", type=int, default=6)
    args = ap.parse_args()
    if not cal.make_quota():
        sys.exit("error: cannot set a CPU quota here (cgroup v1 cpu controller)")
    bare = loop_rates(args.seconds, None)
    base = sum(bare) / len(bare)
    quota = {}
    for period in (2_000, cal.QUOTA_PERIOD_US):
        rates = loop_rates(args.seconds, period)
        quota[f"{period // 1000} ms"] = {"slowdown": round(base / (sum(rates) / len(rates)), 2),
                                         "spread": round(max(rates) / min(rates), 2)}  # fmt: skip
        print(f"quota, {period // 1000} ms period: {quota[f'{period // 1000} ms']}", file=sys.stderr)
    cal.make_quota()  # back to the calibration bench's period
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    calls, blocks = [], []
    stolen0, all0 = cpu_times()
    for _ in range(args.processes):
        out = subprocess.run([sys.executable, "-c", CALL], capture_output=True, text=True, check=True, env=env)
        first, rest = out.stdout.strip().split("\n")[-2:]
        calls.append(round(float(first), 2))
        blocks.append([round(float(v), 2) for v in rest.split()])
        print(f"a 1-row 32-token call on 2 threads, a fresh process: {calls[-1]} ms; then, blocks 1.5 s apart: "
              f"{blocks[-1]} ms ({max(blocks[-1]) / min(blocks[-1]):.2f}x)", file=sys.stderr)  # fmt: skip
    stolen1, all1 = cpu_times()
    print(json.dumps({"bare_spread": round(max(bare) / min(bare), 2), "quota": quota, "call_ms": calls,
                      "blocks_ms": blocks, "steal_share": round((stolen1 - stolen0) / max(1, all1 - all0), 5),
                      "machine": f"{os.uname().machine}, {os.cpu_count()} CPUs"}))  # fmt: skip


if __name__ == "__main__":
    main()
