"""Open-loop load on `edgetts serve`: the batched server against the sequential one (and llama-server).

    python bench/serve_load.py [--config pareto.json] [--requests 300] [--threads 1] [--llama-server PATH]
                               [--levels 0.5,1,2,4] [--plot FILE] [--throttle]

Both servers answer from the same Pareto config (by default one profiled here with the default
grid).  The sequential server's capacity is measured first (requests back to back, one at a
time); then, for each load level (0.5x, 1x, 2x, 4x that capacity), requests arrive as a Poisson
process with mixed deadlines (the frontier's fastest and slowest points, and between), the same
arrival times and questions for every server.  Per level and server: goodput (correct answers
delivered within their deadline, per second of the level), the share of admitted requests that
met their deadline as the client measured it, the share refused (429), and p50/p99 latency of
answers.  With ``--llama-server PATH``, llama.cpp's own server (``-np 16``, same model and
threads) runs the same arrivals with client-side majority voting over the n of the
frontier's widest point (the tiny model's prompt format), no deadline logic.

The last line is one JSON object: ``goodput_ratio_vs_sequential`` at 2x load (target at least
1.5), ``deadline_met_admitted`` (the batched server's worst level; target at least 0.99), and
every level's figures (``server_deadline_met``: the share the server itself counts as on time,
from when it had each request's headers; the client's figure also holds the time outside the server,
whose median and 99th percentile are ``outside_p50_ms`` and ``outside_p99_ms``;
``late_by_deadline`` and ``empty_by_deadline`` count late and empty answers per deadline, and
``misses`` describes the first of them one by one: deadline, client's and server's milliseconds,
empty or not, when it was sent (``sent_s``, seconds into the level; with ``--throttle`` the hogs
start at ``hogs_at_s``), and the server's point, tokens generated, ``early_stop``, predicted
milliseconds and, for an empty answer, the server's ``error`` (how its rows ended);
``points_by_deadline`` counts, per deadline, the requests each point answered and those refused;
``price_mean`` is the mean price on compute the answers were chosen under; ``error_kinds`` names
failed calls).
``--plot FILE`` draws goodput and deadline share against load.  An answer with no text (cut
before any row stated one) counts as a miss in every share.  The servers (and the hogs below)
run niced below the client, so what is measured is the server keeping its deadlines;
``client_lag_p99_ms`` says how far behind schedule the client itself sent requests.

``--throttle``: at the middle arrival of each level two CPU-bound processes start to spin (the
device slows down; they are started half a second before the level, asleep until then, so that
their start-up costs nobody anything at that moment) and each level also reports its figures
``before`` and ``after``; the last line then
has ``deadline_met_admitted_before`` and ``deadline_met_admitted_after`` (the worst level and
server each; targets at least 0.99) and ``answered_admitted`` (the worst level's share of
admitted requests answered with a non-empty answer; target at least 0.99), per server too.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallel_sampling import free_port  # noqa: E402

from edgetts.engines.llamacpp import default_threads  # noqa: E402
from edgetts.engines.spec import serving_threads  # noqa: E402
from edgetts.pareto.config import load_config  # noqa: E402
from edgetts.tasks.datasets import load_dataset  # noqa: E402
from edgetts.tasks.grading import extract_answer, is_equivalent  # noqa: E402


def wait_up(url: str, proc, log: Path) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text(errors='replace')[-400:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


def serve_threads() -> int:
    """The thread count ``edgetts serve`` runs llama.cpp with by default (all cores but one, or
    ``EDGETTS_THREADS``): what the benches start their servers with unless told otherwise."""
    return serving_threads() or default_threads()


def start_edgetts(config: str, threads: int, *extra: str, max_queue: int | None = 256):
    """``edgetts serve`` on a free port, once it answers; ``max_queue=None`` keeps the server's own default."""
    port = free_port()
    # Logs go to a file: a pipe nobody reads fills up and stalls the server writing to it.
    log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
    atexit.register(shutil.rmtree, log.parent, ignore_errors=True)  # kept while the bench runs, for its errors
    queue = () if max_queue is None else ("--max-queue", str(max_queue))
    proc = subprocess.Popen([sys.executable, "-m", "edgetts", "serve", "--config", config, "--port", str(port),
                             "--threads", str(threads), *queue, *extra], stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"), preexec_fn=lambda: os.nice(NICE))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/healthz", proc, log)
    return proc, url


async def edgetts_call(client, url, question, deadline):
    r = await client.post(url + "/v1/completions", json={"prompt": question, "deadline_ms": deadline})
    if r.status_code == 429:
        return "refused", None, None, None, None
    if r.status_code != 200:
        return f"error {r.status_code}", None, None, None, None
    body = r.json()
    info = body["edgetts"]
    return "answered", body["choices"][0]["text"] or None, info["deadline_met"], info["latency_ms"], info


def llama_server_call(n: int, slots: int):
    gate = {}

    async def call(client, url, question, deadline):
        prompt = f"{question}\n<think>"  # the tiny model's prompt (its family's template)
        # Completions beyond the server's slots wait here, not in the HTTP client's pool, whose
        # bookkeeping grows with the square of the requests waiting in it.
        sem = gate.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(2 * slots))

        async def one(seed):
            async with sem:
                r = await client.post(url + "/completion", json={"prompt": prompt, "n_predict": 160, "seed": seed,
                                                                 "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                                                 "min_p": 0.0, "cache_prompt": True})  # fmt: skip
            return extract_answer(r.json().get("content", "")) if r.status_code == 200 else None

        from edgetts.strategies.aggregate import majority_vote

        answers = await asyncio.gather(*(one(s) for s in range(n)))
        return "answered", majority_vote(answers).answer, None, None, None

    return call


def hogs(count: int = 2, at: float = 0.0) -> list[subprocess.Popen]:
    """CPU-bound processes beside the server (niced as the server is: the client keeps its priority),
    spinning from ``at`` (a ``time.time()``): started beforehand and asleep until then, so that
    starting them costs the client and the server nothing at that moment (a fork and an interpreter's
    start-up in the client's event loop delayed answers it was receiving then by 15-24 ms, BENCHMARKS.md)."""
    code = f"import time\ntime.sleep(max(0.0, {at!r} - time.time()))\nwhile True: pass"
    return [subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: os.nice(NICE))
            for _ in range(count)]  # fmt: skip


NICE = 5  # the servers and the hogs run this much below the client: what is measured is the server


async def run_level(url, call, arrivals, work, throttle: bool = False) -> dict:
    """Send ``work`` (question, gold, deadline) at ``arrivals`` (seconds from now); client-side figures.
    With ``throttle``, two CPU-bound processes start at the level's middle arrival (the device slows
    down) and the figures are given for the requests sent before and after."""
    results = []
    middle = arrivals[len(arrivals) // 2]
    lead = 0.5 if throttle else 0.0  # the hogs start up (and fall asleep) before the level begins
    wall0 = time.time() + lead
    started = hogs(at=wall0 + middle) if throttle else []
    try:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=512)) as client:
            # One request before the level, not counted: a client's first one pays for its own first-time
            # code paths (about 40 ms here), which made the first request of a level late with the server
            # having answered in 12 ms.
            with contextlib.suppress(httpx.HTTPError):
                await client.get(url + "/healthz")
            t0 = time.perf_counter() + (wall0 - time.time())  # the level's start, on the client's clock

            async def one(at, item):
                question, gold, deadline = item
                sent = time.perf_counter()
                try:
                    kind, answer, server_met, server_ms, info = await call(client, url, question, deadline)
                except httpx.HTTPError as e:
                    kind, answer, server_met, server_ms, info = f"error {type(e).__name__}", None, None, None, None
                ms = 1000 * (time.perf_counter() - sent)
                lag = 1000 * (sent - t0 - at)  # how far behind its schedule the client sent it
                results.append((kind, answer, gold, deadline, ms, server_met, server_ms, at, lag, info))

            # Each request's task starts at its arrival time: 300 tasks started at once, each sleeping until
            # its time, cost the client's loop so much at the level's start that its first requests were sent
            # late and spent longer outside the server than later ones (bench/price.py's client_lag_p99_ms
            # at 4x: 8-33 ms in ten runs before, 8-15 ms in its runs 18-20 after; BENCHMARKS.md).
            tasks = []
            for at, item in zip(arrivals, work):
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(at, item)))
            await asyncio.gather(*tasks)
            span = max(arrivals[-1], time.perf_counter() - t0)
    finally:
        for p in started:
            p.kill()
            p.wait()
    figures = _figures(results, span)
    if throttle:
        figures["hogs_at_s"] = round(middle, 3)  # when the CPU-bound processes started, seconds into the level
        for part, chosen in (("before", [r for r in results if r[7] < middle]),
                             ("after", [r for r in results if r[7] >= middle])):  # fmt: skip
            half = arrivals[len(arrivals) // 2] if part == "before" else span - middle
            sub = _figures(chosen, max(half, 1e-9))
            figures[part] = {k: sub[k] for k in ("deadline_met_admitted", "answered_admitted", "goodput_per_s",
                                                 "refused_share", "requests", "misses")}  # fmt: skip
    return figures


MISSES = 10  # admitted requests late or empty, described one by one (the first ones) per level and server
MISS_FIELDS = ("point_id", "generated_tokens", "early_stop", "predicted_ms", "error")  # the server's, per miss


def _miss(r: tuple) -> dict:
    """An admitted request that was late or came back empty, as the client and the server saw it."""
    info = r[9] or {}
    return {"deadline_ms": r[3], "client_ms": round(r[4], 1), "server_ms": r[6], "empty": r[1] is None,
            "sent_s": round(r[7], 3),  # seconds into the level (with --throttle, against hogs_at_s)
            **{k: info.get(k) for k in MISS_FIELDS}}  # fmt: skip


def _figures(results: list, span: float) -> dict:
    answered = [r for r in results if r[0] == "answered"]
    on_time = [r for r in answered if r[4] <= r[3] and r[1] is not None]  # an empty answer is a miss
    good = [r for r in on_time if r[1] is not None and is_equivalent(r[1], r[2])]
    lat = sorted(r[4] for r in answered) or [0.0]
    # time outside the server's clock: connection, parsing, both event loops, the client library
    outside = sorted(r[4] - r[6] for r in answered if r[6] is not None) or [0.0]
    prices = [r[9]["price"] for r in answered if r[9] and r[9].get("price") is not None]
    return {
        "requests": len(results), "answered": len(answered), "refused_share": round(
            sum(r[0] == "refused" for r in results) / len(results), 4),
        "errors": sum(r[0].startswith("error") for r in results),
        "error_kinds": sorted({r[0][6:] for r in results if r[0].startswith("error")}),
        "goodput_per_s": round(len(good) / span, 3), "accuracy_answered": round(len(good) / max(1, len(answered)), 4),
        "deadline_met_admitted": round(len(on_time) / max(1, len(answered)), 4),
        "answered_admitted": round(sum(r[1] is not None for r in answered) / max(1, len(answered)), 4),
        "client_lag_p99_ms": round(sorted(r[8] for r in results)[min(len(results) - 1, int(0.99 * len(results)))], 2)
        if results else 0.0,
        "late_by_deadline": {str(d): n for d in sorted({r[3] for r in answered})
                             if (n := sum(r[3] == d and r[4] > d for r in answered))},
        "empty_by_deadline": {str(d): n for d in sorted({r[3] for r in answered})
                              if (n := sum(r[3] == d and r[1] is None for r in answered))},
        "misses": [_miss(r) for r in answered if r[4] > r[3] or r[1] is None][:MISSES],
        # what the server counts, from when it had the headers (None: a server that does not say)
        "server_deadline_met": round(sum(bool(r[5]) for r in answered) / max(1, len(answered)), 4)
        if answered and answered[0][5] is not None else None,
        "p50_ms": round(lat[len(lat) // 2], 2), "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "outside_p50_ms": round(outside[len(outside) // 2], 2),
        "outside_p99_ms": round(outside[min(len(outside) - 1, int(0.99 * len(outside)))], 2),
        # per deadline class: how many took each point, or were refused (what a policy does with each class)
        "points_by_deadline": {str(d): dict(sorted(Counter(
            "refused" if r[0] == "refused" else (r[9] or {}).get("point_id", r[0]) for r in results if r[3] == d
        ).items())) for d in sorted({r[3] for r in results})},
        # the price on compute the answered requests' points were chosen under (edgetts only)
        "price_mean": round(sum(prices) / len(prices), 6) if prices else None,
    }  # fmt: skip


def sequential_capacity(url: str, work, count: int = 60) -> float:
    """Requests per second one at a time, each with the loosest deadline of the mix."""
    loose = max(d for _, _, d in work)
    with httpx.Client(timeout=120) as c:
        for q, _, _ in work[:5]:  # warm up
            c.post(url + "/v1/completions", json={"prompt": q, "deadline_ms": loose})
        t = time.perf_counter()
        for q, _, _ in work[:count]:
            c.post(url + "/v1/completions", json={"prompt": q, "deadline_ms": loose})
        return count / (time.perf_counter() - t)


def default_config(out: Path, threads: int | None = None) -> str:
    """The Pareto config of a profile with the default grid, written to ``out`` (``threads``: profile's own default)."""
    extra = () if threads is None else ("--threads", str(threads))
    subprocess.run([sys.executable, "-m", "edgetts", "profile", "--out", str(out), "--quiet", *extra], check=True)
    return str(out / "pareto.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", type=int, default=serve_threads())
    ap.add_argument("--llama-server")
    ap.add_argument("--plot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", default="0.5,1,2,4", help="loads, as multiples of the sequential capacity")
    ap.add_argument("--throttle", action="store_true", help="two CPU-bound processes start at each level's middle")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    config = args.config or default_config(tmp / "profile", args.threads)
    front = load_config(config)["frontier"]  # artifact paths resolved against the config's folder
    fast, slow = front[0]["latency_ms"], front[-1]["latency_ms"]
    deadlines = [round(3 * fast + 5, 1), round((fast + slow) * 1.5 + 5, 1), round(4 * slow + 20, 1)]
    rng = random.Random(args.seed)
    problems = load_dataset("arith")
    work = [(ex.question, ex.answer, rng.choice(deadlines))
            for ex in rng.sample(problems, min(len(problems), args.requests))]  # fmt: skip
    servers = {"sequential": ("--sequential",), "batched": ()}
    procs = {name: start_edgetts(config, args.threads, *extra) for name, extra in servers.items()}
    calls = {name: edgetts_call for name in servers}
    try:
        capacity = sequential_capacity(procs["sequential"][1], work)
        print(json.dumps({"sequential_capacity_per_s": round(capacity, 2), "deadlines_ms": deadlines}), flush=True)
        if args.llama_server:
            port = free_port()
            from edgetts.models import resolve_model

            model = str(resolve_model(front[-1]["artifact"]))
            log = tmp / "llama-server.log"  # it logs every request
            lp = subprocess.Popen([args.llama_server, "-m", model, "--port", str(port), "-np", "16", "-t",
                                   str(args.threads), "-c", str(16 * 512)],
                                  stdout=subprocess.DEVNULL, stderr=log.open("wb"))  # fmt: skip
            wait_up(f"http://127.0.0.1:{port}/health", lp, log)
            procs["llama-server"] = (lp, f"http://127.0.0.1:{port}")
            calls["llama-server"] = llama_server_call(max(p["n"] for p in front), 16)
        levels = {}
        for level in [float(x) for x in args.levels.split(",")]:
            rate = level * capacity
            t, arrivals = 0.0, []
            for _ in work:
                t += rng.expovariate(rate)
                arrivals.append(t)
            for name, (_, url) in procs.items():
                res = asyncio.run(run_level(url, calls[name], arrivals, work, args.throttle))
                levels.setdefault(str(level), {})[name] = res
                print(json.dumps({"level": level, "server": name, **res}), flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)
    two = levels.get("2.0")
    summary = {
        "goodput_ratio_vs_sequential": round(two["batched"]["goodput_per_s"] / max(two["sequential"]["goodput_per_s"],
                                                                                    1e-9), 3) if two else None,
        "deadline_met_admitted": min(lv["batched"]["deadline_met_admitted"] for lv in levels.values()),
        "sequential_capacity_per_s": round(capacity, 2), "requests_per_level": len(work), "levels": levels,
    }  # fmt: skip
    if args.throttle:  # the worst level, each server (an empty answer counts as a miss)
        for name in servers:
            summary[name] = {f"deadline_met_admitted_{part}": min(lv[name][part]["deadline_met_admitted"]
                                                                  for lv in levels.values())
                             for part in ("before", "after")}  # fmt: skip
            summary[name]["answered_admitted"] = min(lv[name]["answered_admitted"] for lv in levels.values())
        worst = {k: min(summary[name][k] for name in servers) for k in summary["batched"]}
        summary.update(worst)
    if args.plot:
        plot(levels, args.plot)
    print(json.dumps(summary))


def plot(levels: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(k) for k in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in next(iter(levels.values())):
        a.plot(xs, [levels[k][name]["goodput_per_s"] for k in levels], marker="o", label=name)
        b.plot(xs, [levels[k][name]["deadline_met_admitted"] for k in levels], marker="o", label=name)
    a.set(xlabel="offered load (x sequential capacity)", ylabel="goodput (correct on time / s)")
    b.set(xlabel="offered load (x sequential capacity)", ylabel="admitted requests on time", ylim=(0, 1.02))
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
