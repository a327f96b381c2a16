"""Honest latencies: fit residuals, the direct check of a pooled profile, drift, the pareto gate, resuming."""

import json
import math
import subprocess
import sys
from statistics import mean

import pytest
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.profiling.validation import DRIFT_MAX, MAPE_MAX, choose_cells

runner = CliRunner()
SMALL = ["--limit", "5", "--strategies", "single,majority", "--budgets", "16,32", "--n", "2,4", "--threads", "1",
         "--quiet"]  # fmt: skip


def _profile(out, *extra):
    r = runner.invoke(app, ["profile", "--out", str(out), *SMALL, *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "summary.json").read_text())


def _check_validation(v):
    """``latency_validation`` agrees with the cells it reports, by the definitions in validation.py."""
    for m in v["models"]:
        errors = [abs(c["modelled_s"] - c["direct_s"]) / c["direct_s"] for c in m["cells"]]
        assert [c["error"] for c in m["cells"]] == pytest.approx(errors)
        assert m["cells_checked"] == len(m["cells"]) >= 1 and m["mape"] == pytest.approx(mean(errors))
        assert m["ok"] == (m["mape"] <= MAPE_MAX and (m["drift"] is None or abs(m["drift"]) <= DRIFT_MAX))
        assert (m["mape_max"], m["drift_max"]) == (MAPE_MAX, DRIFT_MAX)
    assert v["cells_checked"] == sum(m["cells_checked"] for m in v["models"])
    assert v["mape"] == max(m["mape"] for m in v["models"])
    assert v["ok"] == all(m["ok"] for m in v["models"])
    assert v["ok"] == (v["mape"] <= MAPE_MAX and abs(v["drift"]) <= DRIFT_MAX)


def test_choose_cells_spreads_over_n_and_budget():
    cells = [(s, n, b) for s in ("single", "majority") for n in (1, 4, 8) for b in (32, 64, 128)]
    picked = choose_cells(cells)
    assert len(picked) == 3 and len(set(picked)) == 3
    assert {n for _, n, _ in picked} >= {1, 8} and {b for *_, b in picked} >= {32, 128}
    assert choose_cells(cells[:2]) == sorted(cells[:2], key=lambda c: (c[1], c[2], c[0]))


def test_pooled_profile_reports_residuals_validation_and_drift(tmp_path):
    summary = _profile(tmp_path)
    model = json.loads((tmp_path / "latency-model-tiny.json").read_text())
    assert math.isfinite(model["step_mape"]) and math.isfinite(model["call_mape"]) and model["reference_s"] > 0
    assert min(model[k] for k in ("a", "b", "c", "token_s", "round_s", "row_s")) >= 0
    v = summary["latency_validation"]
    assert v["cells_checked"] >= 3 and isinstance(v["ok"], bool) and v["drift"] is not None
    # the fit's residuals, as the check reports them, are the saved model's
    assert (v["models"][0]["step_mape"], v["models"][0]["call_mape"]) == (model["step_mape"], model["call_mape"])
    _check_validation(v)
    assert all(c["direct_s"] > 0 and c["modelled_s"] > 0 for c in v["models"][0]["cells"])
    assert min(c["latency_s"]["p50"] for c in summary["cells"]) > 0


def test_a_resumed_profile_reuses_the_saved_latency_model(tmp_path):
    _profile(tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.glob("latency-*.json")}
    records = (tmp_path / "records.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "records.jsonl").write_bytes(b"".join(records[: len(records) // 2]))
    _profile(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("latency-*.json")} == saved
    assert len((tmp_path / "records.jsonl").read_bytes().splitlines()) == len(records)


def test_pareto_refuses_an_unvalidated_profile_unless_accepted(tmp_path):
    prof = tmp_path / "p"
    summary = _profile(prof)
    summary["latency_validation"].update(ok=False, mape=0.61, drift=0.4)
    (prof / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "c.json"
    r = runner.invoke(app, ["pareto", str(prof), "--out", str(out), "--no-plot"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "--accept-unvalidated" in r.output
    assert "61%" in r.output and not out.exists()
    r = runner.invoke(app, ["pareto", str(prof), "--out", str(out), "--no-plot", "--accept-unvalidated"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["latency_validation"][str(prof)]["ok"] is False


def test_a_profile_on_a_loaded_machine_is_right_or_flagged(tmp_path):
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        summary = _profile(tmp_path / "p")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    v = summary["latency_validation"]
    # the check ran under the load, against direct runs (it was not skipped or left empty)
    assert v["cells_checked"] >= 1 and math.isfinite(v["mape"]) and math.isfinite(v["drift"])
    _check_validation(v)  # ok means the modelled latencies agree with direct runs under the same load
    r = runner.invoke(app, ["pareto", str(tmp_path / "p"), "--out", str(tmp_path / "c.json"), "--no-plot"])
    if v["ok"]:  # and then the frontier is built from them
        assert r.exit_code == 0, r.output
    else:  # or the profile says so, and the frontier is not built from it silently
        assert r.exit_code == 2 and "failed the direct check" in r.output
