"""``summary.json``: one entry per configuration cell, computed from the records alone.

Fields per cell: ``model`` (the engine spec's label), ``engine`` (the spec), ``strategy``, ``n``,
``budget``, ``queries``; ``accuracy`` with its
95% Wilson interval (``accuracy_ci95``: [low, high]); latency ``latency_s`` p50/p90/p95/p99
(nearest-rank over queries) and mean; ``ttft_s`` and ``tpot_s`` means; ``tokens``: mean
generated, thinking and answer tokens per query and mean rows used; ``energy_j`` (mean per
query, null without a source), ``avg_power_w``, ``energy_source`` (and ``energy_reason`` when it is
``none``), ``energy_rail`` (what was read: ``VDD_IN``, ``package-0``...), ``energy_per_correct_j`` (the
cell's joules over its correct answers; null when energy is unknown or nothing was right);
``profiled_with``: the run-time settings the cell was measured under (threads, GPU layers...);
``peak_rss_mb`` and ``peak_gpu_mb`` (max over queries); ``kv_bytes`` and
``memory_mb``: the KV cache and the whole memory (weights, cache, compute) an engine planned
for the cell needs (max over queries; null for engines that cannot tell).  Because it depends
only on the records, a resumed profile summarizes exactly like an uninterrupted one (timings aside).
:func:`edgetts.profiling.runner.write_summary` adds the pooled profile's ``latency_validation``.
"""

from __future__ import annotations

import math
from statistics import mean


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: a reported p99 is a latency that happened)."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _max_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _one_or_mixed(values) -> str | None:
    known = sorted({v for v in values if v})
    return None if not known else known[0] if len(known) == 1 else "mixed:" + ",".join(known)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# What summarize reads from each record, and what edgetts writes there: a record that breaks these was
# written by something else, and is refused when the log is read (a string where a latency goes was a
# TypeError traceback in the middle of a merge).
RECORD_FIELDS = {
    "model": lambda v: isinstance(v, str), "strategy": lambda v: isinstance(v, str),
    "n": lambda v: _count(v) and v >= 1, "budget": _count,
    "correct": lambda v: _number(v) and 0 <= v <= 1,  # a direct run's 0 or 1, a pooled estimate between
    "latency_s": lambda v: _number(v) and v >= 0, "ttft_s": _number, "tpot_s": _number,
    "generated_tokens": lambda v: _number(v) and v >= 0, "thinking_tokens": lambda v: _number(v) and v >= 0,
    "answer_tokens": _number, "rows_used": lambda v: _number(v) and v >= 0,
    "energy_j": lambda v: v is None or _number(v), "avg_power_w": lambda v: v is None or _number(v),
    "energy_source": lambda v: isinstance(v, str), "peak_rss_mb": _number,
}
OPTIONAL_FIELDS = {
    "peak_gpu_mb": lambda v: v is None or _number(v), "kv_bytes": lambda v: v is None or _number(v),
    "memory_mb": lambda v: v is None or _number(v), "energy_rail": lambda v: v is None or isinstance(v, str),
    "engine": lambda v: v is None or isinstance(v, dict), "profiled_with": lambda v: v is None or isinstance(v, dict),
}  # fmt: skip


def damage(rec: dict) -> str | None:
    """What is wrong with a record that summarize would read (None: nothing)."""
    for name, ok in RECORD_FIELDS.items():
        if name not in rec:
            return f"no {name!r}"
        if not ok(rec[name]):
            return f"its {name!r} is {str(rec[name])[:40]!r}, not what edgetts writes"
    for name, ok in OPTIONAL_FIELDS.items():
        if name in rec and not ok(rec[name]):
            return f"its {name!r} is {str(rec[name])[:40]!r}, not what edgetts writes"
    return None


def summarize(records: dict[str, dict]) -> dict:
    cells: dict[tuple, list[dict]] = {}
    for _, rec in sorted(records.items()):  # in key order: the same records give the same sums, whatever their order
        cells.setdefault((rec["model"], rec["strategy"], rec["n"], rec["budget"]), []).append(rec)
    out = []
    for (model, strategy, n, budget), recs in sorted(cells.items()):
        ok = sum(r["correct"] for r in recs)
        lat = [r["latency_s"] for r in recs]
        energies = [r["energy_j"] for r in recs if r["energy_j"] is not None]
        sources = sorted({r["energy_source"] for r in recs})
        entry = {
            "model": model, "engine": recs[0].get("engine") or {"engine": "llama.cpp", "artifact": model},
            "strategy": strategy, "n": n, "budget": budget, "queries": len(recs),
            "accuracy": ok / len(recs), "accuracy_ci95": list(wilson(ok, len(recs))),
            "latency_s": {"p50": quantile(lat, 0.5), "p90": quantile(lat, 0.9), "p95": quantile(lat, 0.95),
                          "p99": quantile(lat, 0.99), "mean": mean(lat)},
            "ttft_s": mean(r["ttft_s"] for r in recs), "tpot_s": mean(r["tpot_s"] for r in recs),
            "tokens": {"generated": mean(r["generated_tokens"] for r in recs),
                       "thinking": mean(r["thinking_tokens"] for r in recs),
                       "answer": mean(r["answer_tokens"] for r in recs),
                       "rows": mean(r["rows_used"] for r in recs)},
            "energy_j": mean(energies) if energies else None,
            "avg_power_w": mean(r["avg_power_w"] for r in recs if r["avg_power_w"] is not None) if energies else None,
            "energy_source": sources[0] if len(sources) == 1 else "mixed:" + ",".join(sources),
            "energy_rail": _one_or_mixed(r.get("energy_rail") for r in recs),
            # Energy spent per correct answer: all the cell's joules over its correct answers.
            "energy_per_correct_j": sum(energies) / ok if energies and ok and len(energies) == len(recs) else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
            "peak_gpu_mb": _max_known(r.get("peak_gpu_mb") for r in recs),
            "kv_bytes": _max_known(r.get("kv_bytes") for r in recs),
            "memory_mb": _max_known(r.get("memory_mb") for r in recs),
            "profiled_with": recs[0].get("profiled_with"),
        }  # fmt: skip
        if entry["energy_source"] == "none":
            entry["energy_reason"] = recs[0].get("energy_reason")
        out.append(entry)
    return {"schema": "edgetts.summary/v1", "cells": out}
