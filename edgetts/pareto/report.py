"""``pareto.png`` and a self-contained ``report.html`` for a Pareto config.

The plot shows every measured cell as a point (accuracy against the chosen latency
quantile, log-scaled; one marker per model variant), the frontier as a step line, and labels
points with strategy, n and budget.  matplotlib is imported here only (the ``report`` extra),
with the non-interactive Agg backend.

The report is one HTML file with no script and no external resource, so it can be copied off
the device and opened anywhere.  In order it shows:

* the plot, embedded as a base64 PNG;
* the frontier table, one row per frontier point (``<table id="frontier">``);
* which point :meth:`edgetts.runtime.policy.Policy.select` picks for a handful of deadlines,
  from half the fastest point's latency (nothing fits: the fastest point) to the slowest
  point's, spaced geometrically and rounded up to two significant digits;
* when the candidate cells are given, every profiled cell with its 95% accuracy interval and
  why it is or is not on the frontier (on it, outside the constraints, dropped by ``strict``,
  or dominated);
* the device fingerprint and the settings the config was built with.

Every piece of text from the config goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

PNG_TITLE = "edgetts Pareto frontier"


def plot(config: dict, candidates: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = config["objective"]["latency_quantile"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    models = sorted({p["model"] for p in candidates})
    # Model variants share strategy labels: a marker per variant tells their cells apart.
    for model, marker in zip(models, "os^Dv<>ph*"):
        cells = [p for p in candidates if p["model"] == model]
        label = "measured cells" if len(models) == 1 else f"measured: {Path(model).stem}"
        ax.scatter([p["latency_ms"] for p in cells], [100 * p["accuracy"] for p in cells],
                   s=18, marker=marker, color="#9aa5b1", label=label, zorder=2)  # fmt: skip
    front = config["frontier"]
    xs, ys = [p["latency_ms"] for p in front], [100 * p["accuracy"] for p in front]
    ax.step(xs, ys, where="post", color="#d1495b", linewidth=2, label="frontier", zorder=3)
    ax.scatter(xs, ys, s=36, color="#d1495b", zorder=4)
    for p in candidates:
        ax.annotate(f"{p['strategy']} n{p['n']} b{p['budget']}", (p["latency_ms"], 100 * p["accuracy"]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points", color="#333333")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"latency {q} (ms, log scale)")
    ax.set_ylabel("accuracy (%)")
    # Accuracy is a share: the axis starts at 0 (matplotlib would centre all-zero accuracies on 0,
    # showing negative percentages) and leaves room above the best point.
    top = max(100 * p["accuracy"] for p in candidates)
    ax.set_ylim(0, min(100.0, max(10.0, top * 1.1 + 2)))
    ax.set_title(f"{config['task']['dataset']}: accuracy against {q} latency")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, metadata={"Title": PNG_TITLE})  # marks the file as edgetts' own, for a later overwrite
    plt.close(fig)
    return path


def _e(v: object) -> str:
    return html.escape("" if v is None else str(v))


def _num(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _pct(p: dict) -> str:
    return f"{100 * p['accuracy']:.1f}%"


def _ci(p: dict) -> str:
    lo, hi = p["accuracy_ci95"]
    return f"{100 * lo:.1f}–{100 * hi:.1f}%"


def _row(cells: list[object], cls: str | None = None, header: bool = False) -> str:
    tag = "th" if header else "td"
    # Only the frontier table's rows are bare <tr>: other tables' rows carry a class.
    open_ = f'<tr class="{_e(cls)}">' if cls else "<tr>"
    return open_ + "".join(f"<{tag}>{_e(c)}</{tag}>" for c in cells) + "</tr>"


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits: a deadline at a point's latency still fits it."""
    if x <= 0 or not math.isfinite(x):
        return x
    exp = math.floor(math.log10(x)) - 1
    step = 10.0**exp
    v = round(math.ceil(x / step - 1e-9) * step, max(0, -exp))
    return v if v >= x else round(v + step, max(0, -exp))


def deadlines(config: dict, count: int = 5) -> list[float]:
    """Half the fastest latency, then ``count`` deadlines from the fastest to the slowest point."""
    lats = [p["latency_ms"] for p in config["frontier"]]
    lo, hi = lats[0], lats[-1]
    if lo > 0 and hi > lo:
        spread = [lo * (hi / lo) ** (k / (count - 1)) for k in range(count)]
    else:
        spread = [lo + (hi - lo) * k / (count - 1) for k in range(count)]
    return sorted({_round_up(d) for d in [lo / 2, *spread]})


def _frontier_table(config: dict) -> str:
    q = config["objective"]["latency_quantile"]
    head = _row(["#", "id", "engine", "strategy", "n", "budget", "accuracy", "95% CI", f"latency {q} ms",
                 "p50 ms", "p99 ms", "energy J", "J per correct", "memory MB", "tokens/query", "within CI"],
                header=True)  # fmt: skip
    rows = []
    for i, p in enumerate(config["frontier"]):
        lq = p.get("latency_quantiles_ms") or {}
        rows.append(_row([i, p["id"], p.get("engine"), p["strategy"], p["n"], p["budget"], _pct(p), _ci(p),
                          _num(p["latency_ms"], ".2f"), _num(lq.get("p50"), ".2f"), _num(lq.get("p99"), ".2f"),
                          _num(p.get("energy_j"), ".3f"), _num(p.get("energy_per_correct_j"), ".3f"),
                          _num(p.get("memory_mb"), ".0f"), _num(p.get("tokens"), ".1f"),
                          "yes" if p.get("dominated_within_ci") else ""]))  # fmt: skip
    return f'<table id="frontier"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _deadline_table(config: dict) -> str:
    from edgetts.runtime.policy import Policy

    policy = Policy(config)
    q = config["objective"]["latency_quantile"]
    head = _row(["deadline ms", "#", "picks", "strategy", "n", "budget", "accuracy", f"latency {q} ms", "note"],
                "head", header=True)  # fmt: skip
    rows = []
    for d in deadlines(config):
        s = policy.select(d)
        p = s.point
        rows.append(_row([format(d, "g"), s.index, p["id"], p["strategy"], p["n"], p["budget"], _pct(p),
                          _num(s.predicted_ms, ".2f"), "nothing fits: the fastest point" if s.miss else ""],
                         "pick miss" if s.miss else "pick"))  # fmt: skip
    return f'<table id="deadlines"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _key(p: dict) -> str:
    # Not the whole point: a config written to disk and loaded again stores artifact paths differently.
    fields = ("id", "model", "engine", "url", "strategy", "n", "budget", "latency_ms", "accuracy")
    return json.dumps([p.get(k) for k in fields], default=str)


def _cells_table(config: dict, candidates: list[dict]) -> str:
    from edgetts.pareto.config import _fits, frontier

    constraints = config.get("constraints") or {}
    on_front = {_key(p) for p in config["frontier"]}
    # Under strict, a cell can be on the plain frontier and still be dropped: name that reason.
    loose = {_key(p) for p in frontier([c for c in candidates if _fits(c, constraints)])}

    def status(c: dict) -> tuple[str, str]:
        k = _key(c)
        if k in on_front:
            return "frontier", "cell frontier"
        if not _fits(c, constraints):
            return "outside the constraints", "cell excluded"
        if k in loose:
            return "dropped by strict (within CI of a faster point)", "cell excluded"
        return "dominated", "cell"

    q = config["objective"]["latency_quantile"]
    head = _row(["model", "engine", "strategy", "n", "budget", "queries", "accuracy", "95% CI", f"latency {q} ms",
                 "energy J", "J per correct", "memory MB", "tokens/query", "status"], "head", header=True)  # fmt: skip
    rows = []
    for c in sorted(candidates, key=lambda c: (c["latency_ms"], -c["accuracy"], c["id"])):
        text, cls = status(c)
        rows.append(_row([c["model"], c.get("engine"), c["strategy"], c["n"], c["budget"], c.get("queries"), _pct(c),
                          _ci(c), _num(c["latency_ms"], ".2f"), _num(c.get("energy_j"), ".3f"),
                          _num(c.get("energy_per_correct_j"), ".3f"), _num(c.get("memory_mb"), ".0f"),
                          _num(c.get("tokens"), ".1f"), text], cls))  # fmt: skip
    return f'<table id="cells"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _settings_table(candidates: list[dict] | None) -> str:
    """Each device setting's own frontier side by side (profiles calibrated per setting), or nothing."""
    from edgetts.pareto.config import frontier

    by: dict[str, list[dict]] = {}
    for c in candidates or []:
        if c.get("setting"):
            by.setdefault(c["setting"], []).append(c)
    if len(by) < 2:
        return ""
    head = _row(["setting", "frontier points", "fastest ms", "its accuracy", "best accuracy", "its ms",
                 "least J per correct", "at accuracy"], header=True)  # fmt: skip
    rows = []
    for name, cells in sorted(by.items()):
        front = frontier(cells)
        best = front[-1]
        known = [p for p in front if p.get("energy_per_correct_j") is not None]
        thrifty = min(known, key=lambda p: p["energy_per_correct_j"]) if known else None
        rows.append(_row([name, len(front), _num(front[0]["latency_ms"], ".2f"), _pct(front[0]),
                          _pct(best), _num(best["latency_ms"], ".2f"),
                          _num(thrifty["energy_per_correct_j"] if thrifty else None, ".3f"),
                          _pct(thrifty) if thrifty else ""]))  # fmt: skip
    return (f'<h2>Settings compared ({len(by)})</h2>\n<table id="settings"><thead>{head}</thead><tbody>'
            f'{"".join(rows)}</tbody></table>\n<p class="note">each setting\'s own frontier: the same accuracy '
            "(one artifact), this device's latency and energy under each setting.</p>\n")


def _value(v: object) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "—" if v is None else str(v)


def _fields(d: dict, id_: str) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_value(v))}</dd>" for k, v in d.items())
    return f'<dl id="{id_}">{items}</dl>'


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{margin-bottom:.2em}.lead{color:#555;margin-top:0}
img{max-width:100%;height:auto;border:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;white-space:normal;vertical-align:bottom}.note{color:#555;font-size:.85em;margin-top:-1em}
#frontier td:nth-child(-n+4),#deadlines td:nth-child(3),#deadlines td:nth-child(4),#deadlines td:last-child,
#cells td:nth-child(-n+3),#cells td:last-child{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
tr.frontier td{font-weight:bold;color:#a0283a}tr.excluded td{color:#888}tr.miss td{background:#fff3cd}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em;font-size:.9em}
dt{font-weight:bold}dd{margin:0;font-family:monospace;word-break:break-all}
"""


def report(config: dict, png: str | Path, path: str | Path, candidates: list[dict] | None = None) -> Path:
    data = Path(png).read_bytes()
    img = base64.b64encode(data).decode()
    size = _png_size(data)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    q = config["objective"]["latency_quantile"]
    task = config.get("task") or {}
    n_front = len(config["frontier"])
    of_cells = f" of {len(candidates)} profiled cells" if candidates is not None else ""
    lead = f"{n_front} frontier points{of_cells}; accuracy against {q} latency; created {config.get('created')}."
    settings = {"schema": config.get("schema"), "created": config.get("created"), **{f"task.{k}": v for k, v in
                task.items()}, "objective": config.get("objective"), "constraints": config.get("constraints"),
                "strict": config.get("strict"), "profiles": config.get("profiles")}  # fmt: skip
    cells = (
        f"<h2>Every profiled cell ({len(candidates)})</h2>\n{_cells_table(config, candidates)}\n"
        if candidates is not None
        else ""
    )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>edgetts Pareto report: {_e(task.get("dataset"))}</title>
<style>{CSS}</style></head><body>
<h1>Pareto frontier: {_e(task.get("dataset"))}</h1>
<p class="lead">{_e(lead)}</p>
<img id="plot" alt="accuracy against {_e(q)} latency"{dims} src="data:image/png;base64,{img}">
<h2>Frontier ({n_front} points, latency {_e(q)})</h2>
{_frontier_table(config)}
<p class="note">within CI: the point's 95% accuracy interval overlaps a faster frontier point's, so the profile
cannot tell that it is more accurate (<code>--strict</code> drops such points).</p>
<h2>Which point each deadline picks</h2>
{_deadline_table(config)}
{_settings_table(candidates)}{cells}<h2>Device</h2>
{_fields(config.get("device") or {}, "device")}
<h2>Settings</h2>
{_fields(settings, "settings")}
</body></html>
"""
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path
