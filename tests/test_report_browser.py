"""The profile report rendered by a real browser (headless Chromium).

A small profile is written by hand (two model variants, a grid of strategies, n and budgets,
one energy cap that excludes some cells), turned into a config and a report, and rendered
twice: once to a screenshot (with the console logged to stderr), once with ``--dump-dom`` on a
copy that carries a probe script recording the plot's decoded size.  The report must show
something (not a blank page), one frontier-table row per frontier point, one row per profiled
cell, the plot decoded, no console message (the report has no script, so any console line is
the browser complaining), and text from the config as text, never as markup.

Without Chromium the tests skip, except where ``CI`` is set: there they fail.
"""

import base64
import importlib.util
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgetts.pareto.config import build_config
from edgetts.profiling.summary import wilson

WINDOW = (1400, 2600)
PLOT_RED = (0xD1, 0x49, 0x5B)  # the frontier line in pareto.png
HOSTILE = '<script>document.title="pwned"</script>'
PROBE = """<script>addEventListener("load", function () {
  var img = document.getElementById("plot");
  document.body.setAttribute("data-natural", img.naturalWidth + "x" + img.naturalHeight);
});</script>"""


def _required(what: str, found: bool) -> None:
    if found:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required where CI is set")
    pytest.skip(f"{what} is not installed: the report is not rendered in a browser")


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    _required("headless Chromium (apt-get install chromium)", path is not None)
    return path


def _browse(chromium: str, page: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, page.resolve().as_uri()]  # fmt: skip
    # The timeout only keeps a hung browser from hanging the suite.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _console(stderr: str) -> list[str]:
    """Console lines Chromium logged (``INFO:CONSOLE:…`` or ``INFO:CONSOLE(…)``) and uncaught errors."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _cell(model, strategy, n, budget, k):
    queries = 60
    ok = min(queries, int(queries * (0.25 + 0.07 * k + (0.05 if "q8" in model else 0.0))))
    base = (0.05 if "q4" in model else 0.08) * budget / 64 * (1 + 0.35 * (n - 1))
    return {
        "model": model, "strategy": strategy, "n": n, "budget": budget, "queries": queries,
        "accuracy": ok / queries, "accuracy_ci95": list(wilson(ok, queries)),
        "latency_s": {"p50": base, "p90": 1.3 * base, "p95": 1.4 * base, "p99": 1.6 * base, "mean": 1.05 * base},
        "tokens": {"generated": budget * n * 0.7, "thinking": budget * n * 0.5, "answer": 8.0, "rows": n},
        "energy_j": 3.0 * base * n, "energy_source": "rapl", "peak_rss_mb": 600.0 + 40 * n, "peak_gpu_mb": None,
    }  # fmt: skip


def _profile(d: Path, model: str) -> Path:
    grid = [("single", 1, 64), ("single", 1, 256), ("majority", 4, 64), ("majority", 4, 256), ("esc", 8, 64),
            ("esc", 8, 256), ("majority", 8, 256)]  # fmt: skip
    d.mkdir(parents=True)
    cells = [_cell(model, s, n, b, k) for k, (s, n, b) in enumerate(grid)]
    (d / "summary.json").write_text(json.dumps({"schema": "edgetts.summary/v1", "cells": cells}))
    sweep = {"dataset": 'arith <mini> & "friends"', "limit": 60, "seed": 0, "models": [model]}
    (d / "sweep.json").write_text(json.dumps({"digest": "test", "sweep": sweep}))
    device = {"hostname": HOSTILE, "system": "Linux 6.1", "machine": "aarch64", "cpu": "Cortex-A78AE",
              "cpu_count": 8, "memory_mb": 31000, "gpus": [{"name": "Orin", "memory_mb": 31000}],
              "jetson": {"power_mode": "MAXN"}, "versions": {"python": "3.11"}}  # fmt: skip
    (d / "device.json").write_text(json.dumps(device))
    return d


class _Dom(HTMLParser):
    """Rows per table body, element attributes by id, script count and title of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, int] = {}
        self.row_classes: dict[str, list[str]] = {}
        self.by_id: dict[str, dict] = {}
        self.body: dict = {}
        self.scripts = 0
        self.title = ""
        self._table = None
        self._in_tbody = False
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._table = a.get("id")
            self.rows.setdefault(self._table, 0)
            self.row_classes.setdefault(self._table, [])
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self.rows[self._table] += 1
            self.row_classes[self._table].append(a.get("class") or "")
        elif tag == "script":
            self.scripts += 1
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "table":
            self._table = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


@pytest.fixture(scope="module")
def rendered(chromium, tmp_path_factory):
    _required("matplotlib (pip install 'edgetts[report]')", importlib.util.find_spec("matplotlib") is not None)
    from edgetts.pareto.report import plot, report

    tmp = tmp_path_factory.mktemp("report")
    profiles = [_profile(tmp / "q4", "qwen-q4.gguf"), _profile(tmp / "q8", "qwen-q8.gguf")]
    config, cands = build_config(profiles, constraints={"energy_j": {"max": 2.5}})
    png = plot(config, cands, tmp / "pareto.png")
    page = report(config, png, tmp / "report.html", candidates=cands)
    shot = tmp / "screenshot.png"
    r = _browse(chromium, page, f"--screenshot={shot}", tmp=tmp / "browser-1")
    probed = tmp / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _Dom()
    dom.feed(_browse(chromium, probed, "--dump-dom", tmp=tmp / "browser-2").stdout)
    return {"config": config, "cands": cands, "page": page, "shot": shot, "stderr": r.stderr, "dom": dom}


def test_the_screenshot_is_not_blank(rendered):
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(rendered["shot"])  # floats in [0, 1]
    assert img.shape[:2] == (WINDOW[1], WINDOW[0])
    rgb = (img[..., :3] * 255).round().astype(int)
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, table borders, the plot
    non_white = (rgb < 245).any(axis=-1).mean()
    assert 0.03 < non_white < 0.9
    red = (np.abs(rgb - np.array(PLOT_RED)).max(axis=-1) < 24).sum()
    assert red > 200  # the plot's frontier line is on screen, so the image was drawn


def test_tables_have_one_row_per_point_and_cell(rendered):
    dom, config, cands = rendered["dom"], rendered["config"], rendered["cands"]
    assert 2 <= len(config["frontier"]) < len(cands)
    assert dom.rows["frontier"] == len(config["frontier"])
    assert dom.rows["cells"] == len(cands)
    marked = [c for c in dom.row_classes["cells"] if "frontier" in c.split()]
    assert len(marked) == len(config["frontier"])  # each frontier point is found among the cells
    assert any("excluded" in c.split() for c in dom.row_classes["cells"])  # the energy cap excluded some
    assert 3 <= dom.rows["deadlines"] <= 8
    assert "device" in dom.by_id and "settings" in dom.by_id


def test_the_plot_is_embedded_and_decoded(rendered):
    dom = rendered["dom"]
    src = dom.by_id["plot"]["src"]
    assert src.startswith("data:image/png;base64,")
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert dom.body.get("data-natural") == f"{width}x{height}"  # the browser decoded it
    assert width > 500 and height > 300


def test_the_console_is_clean(rendered):
    assert _console(rendered["stderr"]) == []


def test_config_text_is_text_not_markup(rendered):
    dom = rendered["dom"]
    assert dom.scripts == 1  # the probe only: the hostname's <script> was escaped
    assert dom.title == 'edgetts Pareto report: arith <mini> & "friends"'
    assert HOSTILE not in rendered["page"].read_text(encoding="utf-8")


def test_the_console_check_sees_errors(chromium, tmp_path):
    """The check above must be able to fail: a page with a console error and an uncaught one."""
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><p>x</p><script>console.error("logged");throw new Error("thrown");</script>')
    lines = _console(_browse(chromium, page, "--dump-dom", tmp=tmp_path / "browser").stderr)
    assert any("logged" in line for line in lines) and any("Uncaught" in line for line in lines)
