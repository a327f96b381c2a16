"""Benchmark: a mean budget per request held by a price on compute (:mod:`edgetts.runtime.pricing`).

    python bench/price.py [--limit 500] [--profile DIR] [--requests 2000] [--serve] [--levels 0.5,1,2,4]
                          [--rounds 3] [--live N] [--plot FILE]

1. A pooled profile of the tiny model on ``--limit`` arith problems with the default grid
   (or ``--profile DIR``); its problems are split in two halves by a seeded shuffle: the
   Pareto config is built from the first half's records only, the other half is held out.
2. Held-out problems arrive one after another (``--requests`` of them, drawn with replacement,
   seeded); for each, the policy picks a point at a deadline no point misses, with the price a
   :class:`~edgetts.runtime.pricing.MeanSpend` sets (as ``run -`` and ``serve`` hold a budget), and
   the request costs what that point's record for that problem measured (its latency; correct or
   not as recorded).  Budgets: three
   means between the fastest and the slowest frontier point's held-out mean latency.
3. Per budget: the achieved mean against the budget, and the accuracy against the most accurate
   single static point whose held-out mean fits the budget.

With ``--live N``, ``N`` held-out questions also go through the real engine, one a line on the
standard input of ``edgetts run --config <the selection half's config> --mean-ms <the middle
budget> -``: the achieved mean latency (after the first quarter, while the price is found)
against the budget, on this machine now (the budget was set from the profile's latencies).

With ``--serve``, first the served half: ``edgetts serve --load-price`` against price 0 on the
serve_load arrivals and deadline mix (``bench/serve_load.py``: the same arrivals for both, at
``--levels`` times the sequential capacity, client-measured, the servers niced below the client):
correct answers on time per second, the share of admitted requests on time (an empty answer a
miss) and the share refused.  Each level runs ``--rounds`` times with fresh arrival times, the two
servers taking turns to go first (a machine whose speed drifts favours neither); the goodput ratio
is of the mean goodputs over the rounds, the share on time the worst round's; per level and server
also the mean price (``price_mean``), how far the client lagged behind its schedule
(``client_lag_p99_ms``) and, per round, the points each deadline class took
(``points_by_deadline_rounds``) and the admitted requests that were late or empty, as serve_load
reports them (``misses_rounds``).

The last line is one JSON object with ``mean_budget_error`` (worst |achieved - budget| / budget)
and ``accuracy_vs_static_at_budget`` (worst, in points), and with ``--serve``
``goodput_ratio_priced`` (2x load, priced over price 0), ``goodput_ratio_priced_half`` (0.5x) and
``deadline_met_admitted`` (the priced server's worst level).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgetts.pareto.config import frontier
from edgetts.profiling.records import RecordLog
from edgetts.profiling.summary import summarize
from edgetts.runtime import Policy
from edgetts.runtime.pricing import MeanSpend


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


def served(config: str, levels: list[float], requests: int, seed: int, rounds: int = 1) -> dict:
    """The load-aware price against price 0 on the serve_load arrivals (see the module doc); each level
    ``rounds`` times, with fresh arrival times each round and the two servers taking turns to go first."""
    import asyncio

    import serve_load as sl

    from edgetts.pareto.config import load_config
    from edgetts.tasks.datasets import load_dataset

    front = load_config(config)["frontier"]
    fast, slow = front[0]["latency_ms"], front[-1]["latency_ms"]
    deadlines = [round(3 * fast + 5, 1), round((fast + slow) * 1.5 + 5, 1), round(4 * slow + 20, 1)]
    rng = random.Random(seed)
    problems = load_dataset("arith")
    work = [(ex.question, ex.answer, rng.choice(deadlines)) for ex in rng.sample(problems, requests)]
    threads = sl.serve_threads()
    names = ("price 0", "load price")
    procs = {"sequential": sl.start_edgetts(config, threads, "--sequential"),
             "price 0": sl.start_edgetts(config, threads),
             "load price": sl.start_edgetts(config, threads, "--load-price")}  # fmt: skip
    try:
        capacity = sl.sequential_capacity(procs["sequential"][1], work)
        runs = {}
        for level in levels:
            for r in range(rounds):
                t, arrivals = 0.0, []
                for _ in work:
                    t += rng.expovariate(level * capacity)
                    arrivals.append(t)
                for name in names if r % 2 == 0 else names[::-1]:
                    res = asyncio.run(sl.run_level(procs[name][1], sl.edgetts_call, arrivals, work))
                    got = {k: res[k] for k in ("goodput_per_s", "deadline_met_admitted", "refused_share",
                                               "accuracy_answered", "price_mean", "client_lag_p99_ms",
                                               "points_by_deadline", "misses")}  # fmt: skip
                    runs.setdefault(str(level), {}).setdefault(name, []).append(got)
                    print(json.dumps({"level": level, "round": r, "server": name, **got}), file=sys.stderr)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)
    # Per level and server: the mean over rounds, and the worst round's share on time.
    def avg(values):
        values = [v for v in values if v is not None]
        return round(mean(values), 6) if values else None

    rounds_of = ("points_by_deadline", "misses")  # kept per round, not averaged
    out = {lv: {name: {**{k: avg(g[k] for g in got) for k in got[0] if k not in rounds_of},
                       **{f"{k}_rounds": [g[k] for g in got] for k in rounds_of},
                       "deadline_met_admitted": min(g["deadline_met_admitted"] for g in got),
                       "goodput_per_s_rounds": [g["goodput_per_s"] for g in got]}
                for name, got in by.items()} for lv, by in runs.items()}  # fmt: skip

    def ratio(level):
        lv = out.get(str(level))
        return round(lv["load price"]["goodput_per_s"] / max(lv["price 0"]["goodput_per_s"], 1e-9), 3) if lv else None

    return {"goodput_ratio_priced": ratio(2.0), "goodput_ratio_priced_half": ratio(0.5),
            "deadline_met_admitted": min(lv["load price"]["deadline_met_admitted"] for lv in out.values()),
            "sequential_capacity_per_s": round(capacity, 2), "rounds": rounds, "levels": out}  # fmt: skip


def held_live(config: dict, budget: float, held: list, roomy: float, count: int, seed: int) -> dict:
    """``count`` held-out questions (drawn with replacement) through the real engine: ``edgetts run --config
    --mean-ms BUDGET -``, one question a line; the achieved mean latency against the budget and the accuracy."""
    from edgetts.tasks.datasets import load_dataset
    from edgetts.tasks.grading import is_equivalent

    gold = {ex.id: ex for ex in load_dataset("arith")}
    rng = random.Random(seed + 1)
    asked = [gold[rng.choice(held)] for _ in range(count)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    lines = "".join(ex.question.replace("\n", " ") + "\n" for ex in asked)
    run = subprocess.run([sys.executable, "-m", "edgetts", "run", "--config", f.name, "--deadline-ms", str(roomy),
                          "--mean-ms", f"{budget:.3f}", "--json", "-"], input=lines, capture_output=True, text=True,
                         check=True)  # fmt: skip
    os.unlink(f.name)
    out = [json.loads(line) for line in run.stdout.splitlines()]
    ms = [1000 * d["wall_s"] for d in out]
    right = [d["answer"] is not None and is_equivalent(d["answer"], asked[d["line"] - 1].answer) for d in out]
    achieved = mean(ms[len(ms) // 4 :])  # the controller's first quarter finds the price
    r = {"budget_ms": round(budget, 2), "questions": len(out), "achieved_ms": round(achieved, 2),
         "error": round(abs(achieved - budget) / budget, 4), "accuracy": round(mean(right), 4),
         "points": {p: sum(d["point"]["id"] == p for d in out) for p in sorted({d["point"]["id"] for d in out})}}
    print(json.dumps({"live": r}), file=sys.stderr)
    return {"live_mean_budget": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--profile")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="also the served half: --load-price against price 0")
    ap.add_argument("--levels", default="0.5,1,2,4")
    ap.add_argument("--live", type=int, default=0, help="also this many held-out questions through the real engine "
                    "(edgetts run --config --mean-ms at the middle budget)")
    ap.add_argument("--rounds", type=int, default=3, help="with --serve: each level this many times (fresh arrivals, "
                    "the servers taking turns to go first); the ratios are of the mean goodputs")
    ap.add_argument("--plot", help="with --serve: goodput and admitted requests on time against load, both prices")
    args = ap.parse_args()
    prof = Path(args.profile or tempfile.mkdtemp(prefix="price-") + "/profile")
    if not args.profile:
        subprocess.run([sys.executable, "-m", "edgetts", "profile", "--limit", str(args.limit), "--out", str(prof),
                        "--quiet"], check=True)  # fmt: skip
    serve = served(str(prof / "pareto.json"), [float(x) for x in args.levels.split(",")], 300, args.seed,
                   args.rounds) if args.serve else {}
    if serve and args.plot:
        from serve_load import plot

        plot(serve["levels"], args.plot)
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
        ctl = MeanSpend(front, budget)  # what run - and serve hold a --mean-ms with
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
    live = held_live(config, budgets[1], held, roomy, args.live, args.seed) if args.live else {}
    out = {
        "mean_budget_error": max(r["error"] for r in results),
        "accuracy_vs_static_at_budget": min(r["vs_static_points"] for r in results
                                            if r["vs_static_points"] is not None),
        "budgets": results, "held_out_problems": len(held), "requests_per_budget": args.requests,
        "frontier": [p["id"] for p in front],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", **serve, **live,
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
