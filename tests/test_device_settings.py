"""The device path on this CPU-only build: offload asked of llama.cpp, settings apart from
measurements, and memory planned to what the device has (or what --memory-mb allows)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import DIRECT, one_line_error
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.engines import EngineError, EngineSpec, offload
from edgetts.engines.memory import GGUFInfo, check_fits, memory_cap_mb, plan_memory
from edgetts.engines.spec import open_engine
from edgetts.pareto.config import point_spec, profiled_with
from edgetts.profiling.records import RecordLog
from edgetts.runtime import Policy
from edgetts.runtime.executor import Executor, rows_that_fit

runner = CliRunner()
Q = "Evaluate left to right: 8*4-3"
cpu_only = pytest.mark.skipif(offload.supports_offload(), reason="this llama.cpp build can offload")


@pytest.fixture
def warn_again(monkeypatch):
    monkeypatch.setattr(offload, "_warned", False)


def test_gpu_layers_values():
    assert offload.parse_gpu_layers("auto") is None and offload.parse_gpu_layers(None) is None
    assert offload.parse_gpu_layers("-1") == -1 and offload.parse_gpu_layers(12) == 12
    assert offload.parse_gpu_layers(offload.MAX_LAYERS) == offload.MAX_LAYERS
    for bad in ("-2", "1.5", "many", True, "", "99999999999999999999999"):  # the last beyond llama.cpp's int32
        with pytest.raises(EngineError, match="gpu_layers must be auto"):
            offload.parse_gpu_layers(bad)
    assert one_line_error(runner.invoke(app, ["run", "--gpu-layers", "lots", Q])).startswith("error: --gpu-layers")


@cpu_only
def test_offload_asked_of_a_cpu_only_build_runs_on_the_cpu_with_one_warning(warn_again):
    r = runner.invoke(app, ["run", "--gpu-layers", "99", "--n", "2", "--budget", "16", "--json", Q])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: gpu_layers=99") and "CPU" in lines[0]
    assert json.loads(r.stdout)["rows_used"] == 2
    # auto and 0 never warn: nothing was asked that the build cannot do
    for value in ("auto", "0"):
        offload._warned = False
        r = runner.invoke(app, ["run", "--gpu-layers", value, "--n", "1", "--budget", "8", Q])
        assert r.exit_code == 0 and "warning" not in r.stderr


@cpu_only
def test_a_profile_records_what_ran_offload_none(tmp_path, warn_again):
    out = tmp_path / "p"
    r = runner.invoke(app, ["profile", "--out", str(out), "--gpu-layers", "-1", *DIRECT])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: gpu_layers=-1") == 1
    rec = next(iter(RecordLog(out / "records.jsonl").load().values()))
    assert rec["profiled_with"] == {"threads": 1, "gpu_layers": 0, "flash_attn": None, "offload": "none"}
    point = json.loads((out / "pareto.json").read_text())["frontier"][0]
    # The point's engine options hold no run-time setting: those are profiled_with, compared, not applied.
    assert point["profiled_with"]["offload"] == "none" and "threads" not in point.get("engine_options", {})


def test_doctor_says_whether_llama_cpp_can_offload():
    r = runner.invoke(app, ["doctor", "--json"])
    acc = json.loads(r.stdout)["accelerators"]["llama_cpp"]
    assert acc["offload"] is offload.supports_offload()
    assert any(d["type"] == "cpu" for d in acc["devices"])
    text = runner.invoke(app, ["doctor"]).stdout
    assert "llama.cpp offload" in text and ("cannot offload" in text) is not offload.supports_offload()


def test_memory_counts_only_what_is_offloaded():
    info = GGUFInfo("llama", layers=3, kv_heads=2, key_length=64, value_length=64, n_vocab=1000, hidden=128,
                    ffn=256, weight_bytes=4_000_000, repack_bytes=1_000_000)  # fmt: skip
    cpu = plan_memory(info, 1000, 2)
    assert cpu.gpu == 0 and cpu.weights == 5_000_000  # the CPU back end repacks
    full = plan_memory(info, 1000, 2, gpu_layers=4)  # every layer and the output layer
    assert full.weights == 4_000_000 and full.gpu == full.weights + full.kv + full.compute
    assert full.host == full.output  # the logits of every sequence come back to the host
    half = plan_memory(info, 1000, 2, gpu_layers=2)
    assert 0 < half.gpu < full.gpu and half.weights == 4_500_000


def test_a_build_that_can_offload_puts_every_layer_on_the_gpu_by_default(monkeypatch, warn_again, capsys):
    """llama.cpp's answer turned to yes: auto means every layer (-1), the memory plan of the real
    model counts its GPU part, and an explicit request is honoured without a warning."""
    from edgetts.engines.spec import ContextPlan, engine_memory

    monkeypatch.setattr(offload, "supports_offload", lambda: True)
    assert offload.llama_gpu_layers(None) == -1 and offload.llama_gpu_layers(7) == 7
    assert offload.offloaded_layers(None, 3) == 4 and offload.offloaded_layers(99, 3) == 4
    assert offload.offloaded_layers(2, 3) == 2 and offload.offloaded_layers(0, 3) == 0
    assert capsys.readouterr().err == ""
    spec = EngineSpec.from_dict({"engine": "llama.cpp", "artifact": "tiny"})
    plan = ContextPlan(max_rows=2, max_tokens=64)
    auto = engine_memory(spec, plan)
    assert auto.host == auto.output  # everything but the logits lives on the GPU
    assert engine_memory(spec.with_options(gpu_layers=0), plan).gpu == 0


def test_a_discrete_gpu_is_checked_apart_from_host_memory(monkeypatch):
    """With NVML answering (a fake one here), the offloaded part must fit the GPU's free memory and
    the rest MemAvailable; without NVML (a Jetson) the whole plan goes against host memory."""
    import types

    from edgetts.engines.memory import MB, MemoryShortfall, shortfall

    info = GGUFInfo("llama", layers=3, kv_heads=2, key_length=64, value_length=64, n_vocab=1000, hidden=128,
                    ffn=256, weight_bytes=40 * MB)  # fmt: skip
    plan = plan_memory(info, 1000, 2, gpu_layers=4)
    gpu_free = [0.0]
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(free=gpu_free[0] * MB),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu_free[0] = 10.0  # less than the offloaded part: refused on the GPU, whatever the host has
    assert shortfall(plan) == (plan.gpu / MB, 10.0)
    with pytest.raises(MemoryShortfall, match="the device has 10 MB free"):
        check_fits(plan, "m")
    gpu_free[0] = 10_000.0
    assert shortfall(plan) is None
    assert shortfall(plan, cap=plan.gpu / MB - 1) == (plan.gpu / MB, plan.gpu / MB - 1)  # the cap binds the GPU too
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: one pool, the whole plan
    assert shortfall(plan, cap=plan.total / MB - 1) == (plan.total / MB, plan.total / MB - 1)


def test_memory_cap_and_its_refusal(monkeypatch):
    info = GGUFInfo("llama", 2, 2, 64, 64, 1000, 128, 256, 50 * 2**20)
    plan = plan_memory(info, 4096, 4)
    with pytest.raises(EngineError, match=r"needs \d+ MB.*the device has 10 MB the cap allows. Lower --batch-rows"):
        check_fits(plan, "m", cap=10, hint="Lower --batch-rows")
    check_fits(plan, "m", cap=10**6)
    monkeypatch.setenv("EDGETTS_MEMORY_MB", "25")
    assert memory_cap_mb() == 25.0
    for bad in ("nan", "-3", "lots", "inf"):
        monkeypatch.setenv("EDGETTS_MEMORY_MB", bad)
        with pytest.raises(EngineError, match="EDGETTS_MEMORY_MB must be a positive number"):
            memory_cap_mb()
    for bad in ("nan", "0", "-1"):
        r = runner.invoke(app, ["run", "--memory-mb", bad, Q])
        assert one_line_error(r).startswith("error: --memory-mb must be a positive number")


def _config(direct_profile, tmp_path):
    d = tmp_path / "profile"
    shutil.copytree(direct_profile, d)
    return d / "pareto.json"


def test_serve_sizes_its_batch_to_the_memory_it_is_given(direct_profile, tmp_path):
    policy = Policy.load(_config(direct_profile, tmp_path))
    spec = point_spec(policy.frontier[0]).with_options(threads=1, kv_unified=False)
    free = Executor(policy, threads=1)
    assert free.rows == 64  # the cap: max(64, 8 x n); this machine has room for it
    free.close()
    tokens = max(p["budget"] for p in policy.frontier) + 32
    fit = rows_that_fit([spec], 64, tokens, 18.0, 0.85)
    assert 1 <= fit < 64
    capped = Executor(policy, threads=1, memory_mb=18.0)
    assert capped.rows == fit
    capped.engine(policy.frontier[0])  # and it opens within the cap
    capped.close()
    with pytest.raises(EngineError, match=r"do not fit .* under --memory-mb \(not even --batch-rows 1 does\)"):
        Executor(policy, threads=1, memory_mb=2.0)
    too_many = Executor(policy, threads=1, rows=64, memory_mb=18.0)
    most = rows_that_fit([spec], 64, tokens, 18.0, 1.0)  # an explicit --batch-rows gets all the cap, no headroom
    with pytest.raises(EngineError, match=rf"Lower --batch-rows \(at most {most} rows fit: --batch-rows {most}\)"):
        too_many.engine(policy.frontier[0])


def test_serve_refuses_in_one_line_when_nothing_fits(direct_profile, tmp_path):
    cfg = _config(direct_profile, tmp_path)
    r = runner.invoke(app, ["serve", "--config", str(cfg), "--port", "0", "--memory-mb", "2"])
    assert "--batch-rows" in one_line_error(r)


def test_more_threads_than_llama_cpp_runs_are_refused_in_one_line(direct_profile, tmp_path, monkeypatch):
    """Asked for 100,000 threads llama.cpp crashed the process (its pools hold GGML_MAX_N_THREADS)."""
    cfg = _config(direct_profile, tmp_path)
    said = "threads must be a whole number from 1 to 512"
    for args in (["run", "--threads", "100000", Q], ["serve", "--config", str(cfg), "--port", "0", "--threads", "513"],
                 ["profile", "--threads", "513", "--out", str(tmp_path / "p")]):  # fmt: skip
        assert "less than or equal to 512" in one_line_error(runner.invoke(app, args))  # the flag's own range
    with pytest.raises(EngineError, match=said):  # a config's or a sweep's options
        open_engine(EngineSpec("llama.cpp", "tiny", options={"threads": 100000}))
    args = ["calibrate", str(direct_profile), "--out", str(tmp_path / "c"), "--setting", "threads=100000", "--quiet"]
    assert said in one_line_error(runner.invoke(app, args)) and not (tmp_path / "c").exists()
    monkeypatch.setenv("EDGETTS_THREADS", "100000")
    assert "EDGETTS_THREADS must be a whole number from 1 to 512" in one_line_error(runner.invoke(app, ["run", Q]))


def test_settings_are_not_measurements(direct_profile, tmp_path):
    cfg = _config(direct_profile, tmp_path)
    point = json.loads(cfg.read_text())["frontier"][0]
    assert point["profiled_with"]["threads"] == 1  # the suite runs llama.cpp on one thread
    # run --config takes the user's threads over the profile's and says so in one line
    r = runner.invoke(app, ["run", "--config", str(cfg), "--deadline-ms", "60000", "--threads", "2", Q])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "profiled with threads=1; running with threads=2" in notes[0]
    r = runner.invoke(app, ["run", "--config", str(cfg), "--deadline-ms", "60000", Q])
    assert r.exit_code == 0 and "note:" not in r.stderr  # the same settings: nothing to say
    # the executor (serve) runs 2 threads and says so once per engine
    said = []
    ex = Executor(Policy.load(cfg), threads=2, notify=said.append)
    engine, _ = ex.engine(point)
    assert engine.settings()["threads"] == 2 and len(said) == 1 and "running with threads=2" in said[0]
    ex.close()


def test_a_config_of_older_points_keeps_its_threads_as_what_it_was_profiled_with():
    old = {"engine": "llama.cpp", "artifact": "tiny", "engine_options": {"threads": 7, "n_ctx": 2048}}
    assert point_spec(old) == EngineSpec("llama.cpp", "tiny", None, {"n_ctx": 2048})
    assert profiled_with(old) == {"threads": 7}


def test_serve_threads_2_on_a_config_profiled_with_1_says_so(direct_profile, tmp_path):
    cfg = _config(direct_profile, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "edgetts", "serve", "--config", str(cfg), "--port", "0",
                             "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "latencies were profiled with threads=1; running with threads=2" in err
    assert "edgetts serve: opening 1 engine(s)" in err and "edgetts serve: opened tiny in" in err


def test_a_failed_latency_check_is_said_when_a_config_runs(direct_profile, tmp_path):
    cfg = _config(direct_profile, tmp_path)
    data = json.loads(cfg.read_text())
    data["latency_validation"] = {"runs/p": {"ok": False, "mape": 0.31, "drift": 0.1, "cells_checked": 3}}
    cfg.write_text(json.dumps(data))
    r = runner.invoke(app, ["run", "--config", str(cfg), "--deadline-ms", "60000", Q])
    assert r.exit_code == 0, r.output
    assert "runs/p (off by 31%) failed their direct check" in r.stderr



def test_a_config_profiled_in_a_power_mode_says_so_where_there_is_none():
    from edgetts.engines.spec import settings_note

    profiled = {"threads": 5, "gpu_layers": -1, "power_mode": "15W", "power_mode_id": 1}
    note = settings_note("p", profiled, {"threads": 5, "gpu_layers": -1})  # run on a machine with no Jetson
    assert note == "note: p: latencies were profiled with power_mode=15W; running with power_mode=none (no Jetson here)"
    assert settings_note("p", {"threads": 5}, {"threads": 5}) is None  # profiled off a Jetson: nothing to say
