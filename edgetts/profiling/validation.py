"""Whether a pooled profile's modelled latencies can be trusted: direct checks and drift.

Pooled mode does not run most cells; their latencies come from the step-time model
(:mod:`edgetts.profiling.latency`) fitted at the start.  On a busy device (other processes on
the cores, clocks that move) that model can be far off, so after the pool every model's profile
is checked two ways:

- **direct check**: a few cells (at least 3 where the sweep has them, chosen across n and
  budget: the smallest, the largest, and the most rows at the smallest budget) are run directly,
  exactly as production would, on the first ``PROBLEMS`` problems with the pool's seeds; each
  cell's median direct latency is compared with the median of its modelled records on the same
  problems (medians: a call stalled once by another process must not decide), and ``mape`` is
  the mean relative error over the checked cells;
- **drift**: the fixed reference call timed with the model is timed again; ``drift`` is the
  relative change (positive: the device got slower while the profile ran).

``ok`` is ``mape <= MAPE_MAX`` and ``|drift| <= DRIFT_MAX``.  The result goes to
``latency-validation-<model>.json`` and into ``summary.json`` as ``latency_validation``; a failed
check is logged as a warning, and ``edgetts pareto`` refuses such a profile unless told to accept it.
"""

from __future__ import annotations

import logging
import time
from statistics import mean, median

MAPE_MAX = 0.25
DRIFT_MAX = 0.25
PROBLEMS = 5

log = logging.getLogger("edgetts.profiling")


def choose_cells(cells: list[tuple[str, int, int]], count: int = 3) -> list[tuple[str, int, int]]:
    """``count`` cells spread over n and budget (all of them when there are fewer)."""
    order = sorted(cells, key=lambda c: (c[1], c[2], c[0]))
    if len(order) <= count:
        return order
    n_max, b_min = max(c[1] for c in order), min(c[2] for c in order)
    picks = [order[0], order[-1]]
    wide_short = min((c for c in order if c[1] == n_max), key=lambda c: (c[2], c[0]))
    picks += [wide_short] if b_min < order[-1][2] else []
    for c in order[len(order) // 2 :] + order:  # fill from the middle up
        if len(set(picks)) >= count:
            break
        picks.append(c)
    return sorted(set(picks), key=order.index)


def validate(engine, family, model: str, cells, examples, records: dict, steps, cfg, key, tick=None,
             warn: bool = True) -> dict:  # fmt: skip
    """Run the check for one model; ``records`` are its records by key, ``key(s, n, b, r, id)`` their keys;
    ``tick(done, total)`` hears of each direct run and reference call; ``warn`` logs a failed check."""
    from edgetts.engines.base import SamplingParams
    from edgetts.models.families import build_prompt
    from edgetts.profiling.latency import Ticks, reference_time
    from edgetts.strategies import RunConfig, create

    problems = examples[:PROBLEMS]
    sampling = SamplingParams(temperature=cfg.temperature, seed=cfg.seed)  # the pool's seeds of repeat 0
    checked = []
    chosen = choose_cells(cells)
    step = Ticks(len(chosen) * len(problems) + (3 if steps.reference_s > 0 else 0), tick)
    for s, n, b in chosen:
        direct, modelled = [], []
        for ex in problems:
            rec = records.get(key(s, n, b, 0, ex.id))
            if rec is None:
                step()
                continue
            trace = create(s, engine, family, RunConfig(n=n, budget=b, sampling=sampling)).run(ex.question)
            direct.append(trace.wall_s)
            modelled.append(rec["latency_s"])
            step()
        if direct:
            d, m = median(direct), median(modelled)  # one call stalled by another process must not decide
            checked.append({"strategy": s, "n": n, "budget": b, "problems": len(direct), "direct_s": d,
                            "modelled_s": m, "error": abs(m - d) / max(d, 1e-9)})  # fmt: skip
    drift = None
    if steps.reference_s > 0:
        prompt = build_prompt(family, examples[0].question, engine.chat_template())
        after = reference_time(engine, prompt, steps.reference_rows, steps.reference_tokens, step=step)
        drift = after / steps.reference_s - 1
    mape = mean(c["error"] for c in checked) if checked else None
    ok = mape is not None and mape <= MAPE_MAX and (drift is None or abs(drift) <= DRIFT_MAX)
    result = {"model": model, "cells_checked": len(checked), "mape": mape, "drift": drift, "ok": ok,
              "mape_max": MAPE_MAX, "drift_max": DRIFT_MAX, "step_mape": steps.step_mape,
              "call_mape": steps.call_mape, "cells": checked,
              "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if not ok and warn:
        log.warning(
            "LATENCIES NOT VALIDATED for %s: modelled latencies are off by %s on average against direct runs "
            "(allowed %.0f%%), drift %s; the device was probably busy. Profile again on a quiet device, or use "
            "--mode direct; edgetts pareto refuses this profile unless --accept-unvalidated",
            model, "n/a" if mape is None else f"{100 * mape:.0f}%", 100 * MAPE_MAX,
            "n/a" if drift is None else f"{100 * drift:+.0f}%",
        )  # fmt: skip
    return result


def combine(results: list[dict]) -> dict:
    """``summary.json``'s ``latency_validation``: every model's check, and whether all passed."""
    mapes = [r["mape"] for r in results if r["mape"] is not None]
    drifts = [r["drift"] for r in results if r["drift"] is not None]
    return {
        "cells_checked": sum(r["cells_checked"] for r in results),
        "mape": max(mapes) if mapes else None,
        "drift": max(drifts, key=abs) if drifts else None,
        "ok": all(r["ok"] for r in results),
        "models": results,
    }
