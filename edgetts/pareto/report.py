"""``pareto.png`` and a self-contained ``report.html`` for a Pareto config.

The plot shows every measured cell as a point (accuracy against the chosen latency
quantile, log-scaled), the frontier as a step line, and labels points with strategy, n and
budget.  The report embeds the plot as base64 PNG, the frontier table, the device and the
settings, so it is one file to copy off the device.  matplotlib is imported here only (the
``report`` extra), with the non-interactive Agg backend.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def plot(config: dict, candidates: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = config["objective"]["latency_quantile"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ax.scatter([p["latency_ms"] for p in candidates], [100 * p["accuracy"] for p in candidates],
               s=18, color="#9aa5b1", label="measured cells", zorder=2)  # fmt: skip
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
    ax.set_title(f"{config['task']['dataset']}: accuracy against {q} latency")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def report(config: dict, png: str | Path, path: str | Path) -> Path:
    img = base64.b64encode(Path(png).read_bytes()).decode()
    q = config["objective"]["latency_quantile"]

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(p['id'])}</td><td>{p['strategy']}</td><td>{p['n']}</td>"
        f"<td>{p['budget']}</td><td>{100 * p['accuracy']:.1f}% ({100 * p['accuracy_ci95'][0]:.1f}-"
        f"{100 * p['accuracy_ci95'][1]:.1f})</td><td>{p['latency_ms']:.2f}</td>"
        f"<td>{fmt(p.get('energy_j'), '.3f')}</td><td>{fmt(p.get('memory_mb'), '.0f')}</td>"
        f"<td>{'yes' if p.get('dominated_within_ci') else ''}</td></tr>"
        for i, p in enumerate(config["frontier"])
    )
    settings = {k: config.get(k) for k in ("task", "objective", "constraints", "strict", "profiles", "created")}
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgetts Pareto report</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}pre{{background:#f5f5f5;padding:1em}}</style>
</head><body><h1>Pareto frontier: {html.escape(str(config["task"]["dataset"]))}</h1>
<img alt="accuracy against latency" src="data:image/png;base64,{img}">
<h2>Frontier ({len(config["frontier"])} points, latency {q})</h2>
<table><tr><th>#</th><th>id</th><th>strategy</th><th>n</th><th>budget</th><th>accuracy (95% CI)</th>
<th>latency {q} ms</th><th>energy J</th><th>memory MB</th><th>within CI of a faster point</th></tr>{rows}</table>
<h2>Device</h2><pre>{html.escape(json.dumps(config["device"], indent=1))}</pre>
<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=1))}</pre></body></html>"""
    path = Path(path)
    path.write_text(doc)
    return path
