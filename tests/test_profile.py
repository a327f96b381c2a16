"""edgetts profile: directory contents, resume after SIGKILL, interruption, foreign directories."""

import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.profiling.records import RecordLog
from edgetts.profiling.summary import quantile, wilson
from edgetts.telemetry.meters import QueryMeter

runner = CliRunner()
ARGS = ["--limit", "20", "--budgets", "16,48", "--n", "4", "--strategies", "single,majority", "--quiet"]
TIMING = {"latency_s", "ttft_s", "tpot_s", "energy_j", "avg_power_w", "peak_rss_mb", "peak_gpu_mb"}


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "edgetts", "profile", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_records(path, k, proc):
    while proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= k:
            return True
        time.sleep(0.005)
    return False


def untimed(records):
    return {k: {f: v for f, v in r.items() if f not in TIMING} for k, r in records.items()}


def summary_untimed(d):
    cells = json.loads((d / "summary.json").read_text())["cells"]
    return [{k: c[k] for k in ("model", "strategy", "n", "budget", "queries", "accuracy", "accuracy_ci95", "tokens")}
            for c in cells]  # fmt: skip


def test_profile_writes_the_documented_directory(tmp_path):
    r = runner.invoke(app, ["profile", "--out", str(tmp_path), *ARGS])
    assert r.exit_code == 0, r.output
    for name in ("device.json", "sweep.json", "records.jsonl", "summary.json"):
        assert (tmp_path / name).is_file(), name
    device = json.loads((tmp_path / "device.json").read_text())
    assert device["cpu_count"] and device["versions"]["llama-cpp-python"]
    records = RecordLog(tmp_path / "records.jsonl").load()
    assert len(records) == 20 * 4
    rec = next(iter(records.values()))
    assert rec["energy_source"] == QueryMeter().source_name  # the source this machine's meter picks
    if rec["energy_source"] == "none":
        assert rec["energy_reason"] and rec["energy_j"] is None  # never a silent zero
    else:
        assert rec["energy_reason"] is None and rec["energy_j"] >= 0 and rec["avg_power_w"] >= 0
    cells = json.loads((tmp_path / "summary.json").read_text())["cells"]
    assert [(c["strategy"], c["n"], c["budget"]) for c in cells] == [
        ("majority", 4, 16), ("majority", 4, 48), ("single", 1, 16), ("single", 1, 48)]  # fmt: skip
    for c in cells:
        lo, hi = c["accuracy_ci95"]
        assert lo <= c["accuracy"] <= hi and c["queries"] == 20
        lat = c["latency_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
        assert c["peak_rss_mb"] > 0 and c["tokens"]["generated"] > 0
    by = {(c["strategy"], c["budget"]): c["accuracy"] for c in cells}
    assert by[("single", 48)] > by[("single", 16)]  # thinking longer helps the tiny model


@pytest.mark.parametrize("mode", ["pooled", "direct"])
def test_sigkill_mid_cell_then_resume_equals_uninterrupted(tmp_path, mode):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = [*ARGS, "--mode", mode]
    assert run_cli("--out", str(full), *args).wait() == 0
    proc = run_cli("--out", str(killed), *args)
    assert wait_for_records(killed / "records.jsonl", 30, proc), "the profile finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = RecordLog(killed / "records.jsonl").load()
    assert 30 <= len(partial) < 80
    assert run_cli("--out", str(killed), *args).wait() == 0
    resumed = RecordLog(killed / "records.jsonl").load()
    lines = (killed / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(resumed) == 80  # nothing lost, nothing written twice
    assert untimed(resumed) == untimed(RecordLog(full / "records.jsonl").load())
    assert summary_untimed(killed) == summary_untimed(full)


def test_partial_last_line_is_cut_and_remeasured(tmp_path):
    assert runner.invoke(app, ["profile", "--out", str(tmp_path), *ARGS]).exit_code == 0
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # a write cut short by a kill
    assert runner.invoke(app, ["profile", "--out", str(tmp_path), *ARGS]).exit_code == 0
    assert len(RecordLog(path).load()) == 80 and path.read_text().count("\n") == 80


def test_ctrl_c_leaves_a_valid_directory(tmp_path):
    proc = run_cli("--out", str(tmp_path), *ARGS)
    assert wait_for_records(tmp_path / "records.jsonl", 10, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command to continue" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sum(c["queries"] for c in summary["cells"]) == len(RecordLog(tmp_path / "records.jsonl").load())


def test_a_different_sweep_is_refused_unless_forced(tmp_path):
    assert runner.invoke(app, ["profile", "--out", str(tmp_path), *ARGS]).exit_code == 0
    other = ["--limit", "5", "--budgets", "16", "--strategies", "single", "--quiet"]
    r = runner.invoke(app, ["profile", "--out", str(tmp_path), *other])
    assert r.exit_code == 2 and "different sweep" in r.stderr
    r = runner.invoke(app, ["profile", "--out", str(tmp_path), *other, "--force"])
    assert r.exit_code == 0
    kept = list(tmp_path.glob("replaced-*/records.jsonl"))
    assert kept and len(RecordLog(kept[0]).load()) == 80  # the old records were moved, not lost
    assert len(RecordLog(tmp_path / "records.jsonl").load()) == 5


def test_yaml_config_and_its_errors(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("limit: 5\nstrategies: [single]\nbudgets: [16]\nengine: {threads: 2}\n")
    r = runner.invoke(app, ["profile", "--config", str(cfg), "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "sweep.json").read_text())["sweep"]["engine"]["threads"] == 2
    cfg.write_text("limit: 5\nbudget: [16]\n")
    r = runner.invoke(app, ["profile", "--config", str(cfg), "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "unknown key(s) budget" in r.stderr
    r = runner.invoke(app, ["profile", "--strategies", "beam", "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "strategies" in r.stderr
    r = runner.invoke(app, ["profile", "--budgets", "a,b", "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "--budgets" in r.stderr


def test_statistics_helpers():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert quantile([5, 1, 3, 2, 4], 0.5) == 3 and quantile([5, 1, 3, 2, 4], 0.99) == 5


def test_pooled_mode_records_and_identities(tmp_path):
    r = runner.invoke(app, ["profile", "--out", str(tmp_path), *ARGS])
    assert r.exit_code == 0, r.output
    records = RecordLog(tmp_path / "records.jsonl").load()
    assert {rec["mode"] for rec in records.values()} == {"pooled"}
    assert all(0.0 <= rec["correct"] <= 1.0 for rec in records.values())
    model = json.loads((tmp_path / "latency-model-tiny.json").read_text())
    assert model["a"] > 0 and model["token_s"] > 0
    for key, rec in records.items():
        if rec["strategy"] == "majority":  # n rows of the same pool: n times one row's tokens
            single = records[key.replace("|majority|n4|", "|single|n1|")]
            assert rec["generated_tokens"] == pytest.approx(4 * single["generated_tokens"])


def test_pooled_mode_measures_unpoolable_strategies_directly(tmp_path):
    args = ["--limit", "5", "--budgets", "16,32", "--n", "2", "--strategies", "single,weighted", "--quiet"]
    assert runner.invoke(app, ["profile", "--out", str(tmp_path), *args]).exit_code == 0
    modes = {(r["strategy"], r["mode"]) for r in RecordLog(tmp_path / "records.jsonl").load().values()}
    assert modes == {("single", "pooled"), ("weighted", "direct")}
