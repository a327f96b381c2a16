"""edgetts profile: directory contents, resume after SIGKILL, interruption, foreign directories."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import DIRECT, SMALL, one_line_error
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
    # An engine whose options take its probes away (a cache stream per row) is measured directly.
    split = tmp_path / "split"
    args += ["--engine-option", "kv_unified=false"]
    assert runner.invoke(app, ["profile", "--out", str(split), *args]).exit_code == 0
    assert {r["mode"] for r in RecordLog(split / "records.jsonl").load().values()} == {"direct"}


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_second_profile_process_into_the_same_directory_exits_at_once(tmp_path):
    # enough problems that the first is still at work when stopped (the tiny model answers hundreds a second)
    args = ["--limit", "300", "--budgets", "16", "--strategies", "single", "--mode", "direct", "--quiet"]
    first = run_cli("--out", str(tmp_path), *args)
    assert wait_for_records(tmp_path / "records.jsonl", 1, first), "the first profile finished too early"
    first.send_signal(signal.SIGSTOP)  # it holds the lock, stopped mid-sweep, until SIGCONT
    try:
        second = run_cli("--out", str(tmp_path), *args)
        _, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert f"pid {first.pid} on " in err and "another edgetts profile" in err
    assert first.wait(timeout=300) == 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(RecordLog(tmp_path / "records.jsonl").load()) == 300  # one writer: no duplicates
    r = runner.invoke(app, ["profile", "--out", str(tmp_path), *args])  # the lock went with the first process
    assert r.exit_code == 0, r.output


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    from edgetts.profiling.lock import hold, holder

    with hold(tmp_path):
        info = holder(tmp_path)
        proc = run_cli("--out", str(tmp_path), *DIRECT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and f"pid {info['pid']} on {info['host']}, started {info['started']}" in err
        assert not (tmp_path / "records.jsonl").exists()
        assert runner.invoke(app, ["profile", "--out", str(tmp_path), *DIRECT]).exit_code == 0  # reentrant
    (tmp_path / "records.jsonl").write_text("")
    assert run_cli("--out", str(tmp_path), *DIRECT).wait(timeout=300) == 0  # released with the block
    assert len(RecordLog(tmp_path / "records.jsonl").load()) == 5


def test_calibrate_and_merge_into_a_directory_another_run_writes_say_so_in_one_line(small_profile, tmp_path):
    """They take the output's lock as profile does; a held one was a LockError traceback."""
    from edgetts.profiling.lock import hold, holder

    with hold(tmp_path):
        info = holder(tmp_path)
        for args in (["calibrate", str(small_profile), "--out", str(tmp_path), "--quiet"],
                     ["merge", str(small_profile), "--out", str(tmp_path)]):  # fmt: skip
            proc = subprocess.run([sys.executable, "-m", "edgetts", *args], capture_output=True, text=True, timeout=120)
            err = proc.stderr.strip()
            assert proc.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
            assert f"pid {info['pid']} on {info['host']}" in err


@pytest.mark.parametrize(
    "damage, says, repair",
    [
        ("garbage sweep", "sweep.json is damaged", "delete sweep.json"),
        ("empty list sweep", "sweep.json is damaged", "delete sweep.json"),
        ("corrupt device", "device.json is damaged", "delete it"),
        ("damaged record", "records.jsonl:3: damaged record", "delete the line(s) named"),
        ("duplicate record", "records.jsonl:6: duplicate record", "delete the line(s) named"),
        ("two damaged lines", "key') (and 1 more such lines: 4)", "records.jsonl:2: damaged record"),
    ],
)
def test_damaged_state_is_reported_with_its_repair(small_profile, tmp_path, damage, says, repair):
    d = _copy(small_profile, tmp_path / "p")
    records = d / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    if damage == "garbage sweep":
        (d / "sweep.json").write_text("not json at all")
    elif damage == "empty list sweep":
        (d / "sweep.json").write_text("[]")
    elif damage == "corrupt device":
        (d / "device.json").write_text('{"cpu": ')
    elif damage == "damaged record":
        records.write_text("".join(lines[:2]) + "{broken\n" + "".join(lines[3:]))
    elif damage == "two damaged lines":
        records.write_bytes(b"".join([lines[0].encode(), b"\xff\xfe\n", lines[1].encode(), b"[1]\n",
                                      *(ln.encode() for ln in lines[2:])]))  # fmt: skip
    else:
        records.write_text("".join(lines) + lines[0])
    msg = one_line_error(runner.invoke(app, ["profile", "--out", str(d), *SMALL]))
    assert says in msg and repair in msg and "different sweep" not in msg
    assert not list(d.glob("replaced-*"))  # nothing was moved aside
    if "sweep" in damage:  # the repair each message gives
        (d / "sweep.json").unlink()
    elif damage == "corrupt device":
        (d / "device.json").unlink()
    elif damage == "damaged record":
        records.write_text("".join(lines[:2]) + "".join(lines[3:]))
    else:  # a duplicate deleted, or the damaged lines
        records.write_text("".join(lines))
    r = runner.invoke(app, ["profile", "--out", str(d), *SMALL])
    assert r.exit_code == 0, r.output
    assert len(RecordLog(records).load()) == 5 and records.read_text().count("\n") == 5


def test_a_failed_start_leaves_nothing_and_a_stub_does_not_block_the_rerun(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(60))  # passes the magic check, fails to load
    out = tmp_path / "new" / "profile"
    r = runner.invoke(app, ["profile", "--out", str(out), "--model", str(junk), *DIRECT])
    assert r.exit_code == 2 and r.stderr.splitlines()[-1].startswith("error:")  # after llama.cpp's own log
    assert "junk.gguf" in r.stderr and not (tmp_path / "new").exists()  # the folders this run made are gone
    stub = tmp_path / "stub"  # what a failed start used to leave: device and sweep, no records
    stub.mkdir()
    (stub / "sweep.json").write_text('{"digest": "0123456789abcdef", "sweep": {}}')
    (stub / "device.json").write_text("{}")
    r = runner.invoke(app, ["profile", "--out", str(stub), *DIRECT])
    assert r.exit_code == 0, r.output
    assert len(RecordLog(stub / "records.jsonl").load()) == 5
    assert json.loads((stub / "device.json").read_text())["cpu_count"]  # the fingerprint was written anew


def test_out_never_overwrites_files_edgetts_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "numbers"}')
    for extra in ([], ["--force"]):
        msg = one_line_error(runner.invoke(app, ["profile", "--out", str(mine), *DIRECT, *extra]))
        assert "not a profile directory" in msg and "summary.json" in msg
    assert sorted(p.name for p in mine.iterdir()) == ["summary.json"]
    assert (mine / "summary.json").read_text() == '{"my": "numbers"}'
    msg = one_line_error(runner.invoke(app, ["profile", "--out", str(mine / "summary.json"), *DIRECT]))
    assert "not a directory" in msg


def test_force_moves_every_file_of_the_previous_run(small_profile, tmp_path):
    d = _copy(small_profile, tmp_path / "p")
    for name in ("pareto.png", "report.html"):
        (d / name).write_text("derived")  # as the report extra writes them
    before = {p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith(".")}
    assert {"pareto.json", "latency-model-tiny.json", "summary.json"} <= set(before)
    other = ["--limit", "3", "--budgets", "16", "--strategies", "single", "--quiet", "--force"]
    assert runner.invoke(app, ["profile", "--out", str(d), *other]).exit_code == 0
    (kept,) = d.glob("replaced-*")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before  # moved whole, nothing overwritten
    # the new sweep's own pictures (quiet silences the terminal, not the files), not the old ones
    assert (d / "pareto.png").read_bytes() != b"derived" and (d / "report.html").read_bytes() != b"derived"
    assert len(RecordLog(d / "records.jsonl").load()) == 3


def test_a_ctrl_c_swallowed_by_a_native_callback_is_not_lost():
    """Python raises Ctrl-C's KeyboardInterrupt at its next bytecode; inside llama.cpp's log callback ctypes
    prints and drops it.  The profile command remembers the signal too, so it still stops as interrupted."""
    import contextlib
    import signal

    from edgetts.cli import _interrupts

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with _interrupts() as interrupted:
            assert not interrupted()
            with contextlib.suppress(KeyboardInterrupt):  # what a ctypes callback does with it: dropped
                signal.raise_signal(signal.SIGINT)
            assert interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job in the background of a script: stays ignored
        with _interrupts() as interrupted:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not interrupted()
    finally:
        signal.signal(signal.SIGINT, before)
