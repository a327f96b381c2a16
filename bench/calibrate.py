"""Benchmark: a profile calibrated to other settings of this machine against direct profiles there.

    python bench/calibrate.py [--limit 50] [--trials 3] [--source direct|pooled] [--slow quota|hog] [--keep DIR]

1. The source: ``edgetts profile`` of the default grid with llama.cpp on 1 thread, direct by
   default: its records hold the same rows, and so the same correctness, as the direct profiles
   the calibrations are judged against (the same problems and seeds), so that ``same_choice``
   measures the calibrated latencies alone.  ``--source pooled`` calibrates a pooled profile (as
   users profile by default), whose accuracies are estimates from a pool of rows: they differ
   from a direct run's by a few points, which moves some choices whatever the latencies.
2. Per target setting, ``edgetts calibrate SOURCE --setting ...`` (timed: ``calibrate_s``) between
   two direct profiles of the same sweep on that setting (``edgetts profile --mode direct``, one
   before and one after), whose per-cell mean is the ground truth: this machine's speed drifts by
   tens of percent over minutes, and a reference measured on both sides of the calibration is
   centred on the moment it measured (a steady drift cancels).  The settings: ``threads=2``; and
   a slower device, made with a CPU quota (a cgroup v1 ``cpu`` group with ``cpu.cfs_period_us``
   20000 and ``cpu.cfs_quota_us`` 10000: half a core, which the calibration and the direct
   profiles run inside) where the machine allows cgroups, else a steady CPU-bound process beside
   them (``--slow hog``).
3. Per setting: the per-cell error of the calibrated mean latency against the reference (the
   same problems and seeds, so the same rows), their mean (``latency_mape``), and the share of
   deadlines, 40 of them log-spaced between the reference config's fastest and slowest point, for
   which the calibrated and the reference Pareto configs choose the same (strategy, n, budget)
   (``same_choice``); also the cells' p95 error (``p95_mape``: configs are built on the p95) and
   the mean error against each direct profile alone (``vs_before``, ``vs_after``).
4. Steps 2 and 3 run ``--trials`` times per setting (three by default), each calibration between its
   own two direct profiles; a setting's ``latency_mape`` and ``same_choice`` are the trials'
   medians (this VM changes speed by tens of percent within a minute now and then, which one
   trial's reference may catch and the next not), every trial is reported, and the worst single
   trial is in ``worst_trial``.
5. The noise floor: the two direct profiles compared with each other the same way
   (``direct_floor``: how far two direct profiles of one setting differ, which no calibration can
   beat when it is judged against one of them).

Each command runs as users run it (``python -m edgetts``); the last line is one JSON object with
``latency_mape`` and ``same_choice`` (the worst setting's median each) and ``calibrate_s`` (the
slowest calibration of all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetts.pareto.config import build_config
from edgetts.profiling.calibrate import cell_of
from edgetts.runtime import Policy

CGROUP = Path("/sys/fs/cgroup/cpu/edgetts-bench")
# Half of one core per 20 ms: with a 2 ms period the throttling itself costs time on this VM, and its
# speed moves more from one second to the next (bench/vm_steadiness.py measures both periods).
QUOTA_PERIOD_US = 20_000


def cli(*args, slow: str | None = None) -> float:
    """Run ``edgetts ARGS`` (inside the quota group with ``slow='quota'``); returns its seconds."""
    env = {k: v for k, v in os.environ.items() if k != "EDGETTS_THREADS"}  # the command's own flags decide
    procs = CGROUP / "cgroup.procs"

    def enter():  # in the child, before exec: the whole command runs under the quota
        procs.write_text(str(os.getpid()))

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgetts", *args], check=True, env=env, stdout=subprocess.DEVNULL,
                   preexec_fn=enter if slow == "quota" else None)  # fmt: skip
    return time.perf_counter() - t0


def make_quota(period_us: int = QUOTA_PERIOD_US) -> bool:
    """The quota group at half a core per ``period_us``; False where cgroups do not allow it."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "cpu.cfs_quota_us").write_text("-1")  # the period may be shortened only below an unlimited quota
        (CGROUP / "cpu.cfs_period_us").write_text(str(period_us))
        (CGROUP / "cpu.cfs_quota_us").write_text(str(period_us // 2))
        return True
    except OSError:
        return False


def hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def cells(d: Path) -> dict:
    summary = json.loads((d / "summary.json").read_text())
    return {cell_of(c): c for c in summary["cells"]}


def mean_profile(a: Path, b: Path, out: Path) -> Path:
    """A profile directory like ``a`` whose cells' latency figures are the means of ``a``'s and ``b``'s (the
    same sweep, the same rows: only the times differ)."""
    shutil.copytree(a, out, dirs_exist_ok=True)
    summary = json.loads((a / "summary.json").read_text())
    other = cells(b)
    for c in summary["cells"]:
        twin = other[cell_of(c)]["latency_s"]
        c["latency_s"] = {k: (v + twin[k]) / 2 if isinstance(v, int | float) else v for k, v in c["latency_s"].items()}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def compare(calibrated: Path, direct: Path) -> dict:
    cal, ref = cells(calibrated), cells(direct)

    def error(k, stat):
        return abs(cal[k]["latency_s"][stat] - ref[k]["latency_s"][stat]) / ref[k]["latency_s"][stat]

    errors = {k: error(k, "mean") for k in ref if k in cal}
    cfg_cal, _ = build_config([calibrated])
    cfg_ref, _ = build_config([direct])
    lat = [p["latency_ms"] for p in cfg_ref["frontier"]]
    lo, hi = min(lat), max(lat) * 1.5
    grid = [lo * (hi / lo) ** (k / 39) for k in range(40)]
    pick_cal, pick_ref = Policy(cfg_cal), Policy(cfg_ref)

    same = sum(cell_of(pick_cal.select(d).point) == cell_of(pick_ref.select(d).point) for d in grid) / len(grid)
    return {"latency_mape": sum(errors.values()) / len(errors), "same_choice": same,
            "p95_mape": sum(error(k, "p95") for k in errors) / len(errors),  # the quantile configs are built on
            "cells": {"/".join(map(str, k)): round(v, 4) for k, v in sorted(errors.items())},
            "validation": json.loads((calibrated / "summary.json").read_text()).get("latency_validation", {}).get("ok")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--slow", choices=["quota", "hog"], default=None, help="default: quota where cgroups allow")
    ap.add_argument("--keep", help="keep the profiles in this folder")
    ap.add_argument("--trials", type=int, default=3, help="calibrations per setting, each between its own two direct "
                    "profiles; a setting's figures are the trials' medians")
    ap.add_argument("--source", choices=["direct", "pooled"], default="direct", help="how the source is profiled")
    args = ap.parse_args()
    if args.trials < 1:
        sys.exit("error: --trials must be at least 1")
    slow = args.slow or ("quota" if make_quota() else "hog")
    if slow == "quota" and not make_quota():
        sys.exit("error: cannot set a CPU quota here (cgroup v1 cpu controller); use --slow hog")
    root = Path(args.keep or tempfile.mkdtemp(prefix="edgetts-calibrate-"))
    root.mkdir(parents=True, exist_ok=True)
    grid = ["--limit", str(args.limit), "--quiet"]
    src = root / "source"
    print(f"source: {cli('profile', '--mode', args.source, '--threads', '1', '--out', str(src), *grid):.1f} s",
          file=sys.stderr)  # fmt: skip
    results = {}
    targets = (("threads=2", "threads=2", "2", None), (f"slow ({slow})", "threads=1", "1", slow))
    for name, setting, threads, how in targets:
        tag = name.split()[0]
        trials = []
        for trial in range(1, args.trials + 1):
            beside = hog() if how == "hog" else None
            base = root / f"{tag}-{trial}"
            before, after, cal = base / "direct", base / "direct-again", base / "calibrated"
            direct = ["profile", "--mode", "direct", "--threads", threads, *grid, "--out"]
            try:
                cli(*direct, str(before), slow=how)
                seconds = cli("calibrate", str(src), "--out", str(cal), "--setting", setting, "--quiet", slow=how)
                cli(*direct, str(after), slow=how)
            finally:
                if beside:
                    beside.kill()
            floor = compare(after, before)
            reference = mean_profile(before, after, base / "direct-mean")
            brief = ("latency_mape", "same_choice")
            vs_before, vs_after = compare(cal, before), compare(cal, after)
            r = {**compare(cal, reference), "calibrate_s": round(seconds, 2),
                 "vs_before": {k: vs_before[k] for k in brief},
                 "vs_after": {k: vs_after[k] for k in brief},
                 "direct_floor": {k: floor[k] for k in brief}}  # fmt: skip
            trials.append(r)
            print(f"{name}, trial {trial}: latency error {r['latency_mape']:.3f} (worst cell "
                  f"{max(r['cells'].values()):.3f}; p95 {r['p95_mape']:.3f}), same choice {r['same_choice']:.2f}, "
                  f"calibrate {seconds:.1f} s, "
                  f"its check ok: {r['validation']}; against the direct profile before "
                  f"{r['vs_before']['latency_mape']:.3f}, after {r['vs_after']['latency_mape']:.3f}; the two direct "
                  f"profiles: latency error {floor['latency_mape']:.3f}, same choice {floor['same_choice']:.2f}",
                  file=sys.stderr)  # fmt: skip
        results[name] = {"latency_mape": median(r["latency_mape"] for r in trials),
                         "same_choice": median(r["same_choice"] for r in trials),
                         "calibrate_s": max(r["calibrate_s"] for r in trials), "trials": trials}  # fmt: skip
    out = {
        "latency_mape": round(max(r["latency_mape"] for r in results.values()), 4),
        "same_choice": round(min(r["same_choice"] for r in results.values()), 4),
        "calibrate_s": round(max(r["calibrate_s"] for r in results.values()), 2),
        "worst_trial": {"latency_mape": round(max(x["latency_mape"] for r in results.values() for x in r["trials"]), 4),
                        "same_choice": round(min(x["same_choice"] for r in results.values() for x in r["trials"]), 4)},
        "settings": results, "slow": slow, "limit": args.limit, "source": args.source,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    print(json.dumps(out))
    if not math.isfinite(out["latency_mape"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
