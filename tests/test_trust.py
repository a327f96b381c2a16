"""Commands a user can trust: one-line errors, outputs that never clobber, serve's start-up checks."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import typer
from conftest import SMALL, one_line_error
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.models import BUILTIN

runner = CliRunner()


@pytest.mark.parametrize(
    "args, says",
    [
        (["run", "q", "--n", "0"], "'--n'"),
        (["evaluate", "--n", "0"], "'--n'"),
        (["profile", "--limit", "0"], "'--limit'"),
        (["serve", "--config", "x.json", "--port", "70000"], "'--port'"),
        (["run"], "Missing argument"),
        (["run", "q", "--bogus"], "No such option: --bogus"),
        (["bogus"], "No such command"),
        (["standin", "--shape", "narrow-qwen3", "--seed", "-1", "--out", "x.gguf"], "'--seed'"),  # was a traceback
        (["run", "q", "--seed", "-1"], "'--seed'"),  # a row seeded 2**32 - 1 drew a random seed
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, says):
    assert says in one_line_error(runner.invoke(app, args))


def test_help_and_version_stay_normal():
    r = runner.invoke(app, ["run", "--help"])
    assert r.exit_code == 0 and "Usage" in r.stdout and not r.stderr
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("edgetts ") and r.stdout.split()[1][0].isdigit()


def test_profile_help_shows_the_default_grid():
    text = runner.invoke(app, ["profile", "--help"], env={"COLUMNS": "200"}).stdout
    out = " ".join(text.replace("│", " ").split())  # a help text wrapped inside the table's borders reads as one
    for default in ("single,majority,esc", "32,64,128", "1,4,8", "Default: 50", "Default: arith", "Default: pooled"):
        assert default in out


def test_family_defaults_agree_across_commands():
    group = typer.main.get_command(app)
    defaults = {name: next(p.default for p in group.commands[name].params if p.name == "family")
                for name in ("run", "evaluate")}  # fmt: skip
    assert defaults == {"run": "auto", "evaluate": "auto"}
    assert "auto" in one_line_error(runner.invoke(app, ["evaluate", "--family", "gpt5"]))


def test_profile_table_shows_whole_model_names(tmp_path):
    model = tmp_path / "a-rather-long-variant-name-q4_k_m.gguf"
    model.symlink_to(BUILTIN["tiny"])
    args = ["--limit", "2", "--budgets", "16", "--strategies", "single"]
    r = runner.invoke(app, ["profile", "--out", str(tmp_path / "p"), "--model", str(model), *args],
                      env={"COLUMNS": "400"})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert model.name in r.stdout


def test_pareto_outputs_are_checked_and_never_partial(direct_profile, tmp_path):
    under_file = str(direct_profile / "pareto.json" / "c.json")
    args = ["pareto", str(direct_profile), "--out", under_file, "--accept-unvalidated"]
    msg = one_line_error(runner.invoke(app, args))
    assert "is a file, not a directory" in msg
    out_dir = tmp_path / "userdir"
    out_dir.mkdir()
    args = ["pareto", str(direct_profile), "--out", str(out_dir), "--accept-unvalidated"]
    assert "is a directory" in one_line_error(runner.invoke(app, args))
    assert not list(tmp_path.rglob("*.tmp")) and not list(out_dir.iterdir())
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "config"}')
    msg = one_line_error(runner.invoke(app, ["pareto", str(direct_profile), "--out", str(mine), "--no-plot",
                                              "--accept-unvalidated"]))  # fmt: skip
    assert "not written by edgetts" in msg and mine.read_text() == '{"my": "config"}'
    ok = tmp_path / "configs" / "pareto.json"
    for _ in range(2):  # a config edgetts wrote is replaced
        args = ["pareto", str(direct_profile), "--out", str(ok), "--no-plot", "--accept-unvalidated"]
        assert runner.invoke(app, args).exit_code == 0


def test_export_c_outputs_are_checked(direct_profile, tmp_path):
    config = str(direct_profile / "pareto.json")
    msg = one_line_error(runner.invoke(app, ["export-c", config, "--out", str(tmp_path / "nodir" / "x.h")]))
    assert "no directory" in msg and not (tmp_path / "nodir").exists()
    mine = tmp_path / "mine.h"
    mine.write_text("int my_code;\n")
    assert "not written by edgetts" in one_line_error(runner.invoke(app, ["export-c", config, "--out", str(mine)]))
    assert mine.read_text() == "int my_code;\n"
    for _ in range(2):
        assert runner.invoke(app, ["export-c", config, "--out", str(tmp_path / "p.h")]).exit_code == 0
    assert not list(tmp_path.glob(".*.tmp"))


def _config_with(direct_profile, tmp_path, name, **changes):
    config = json.loads((direct_profile / "pareto.json").read_text())
    for p in config["frontier"]:
        p.update(changes)
        if "artifact" not in changes:
            p["artifact"] = "tiny"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "name, changes, says",
    [
        ("passwd", {"artifact": "/etc/passwd"}, "not a GGUF file"),
        ("missing", {"artifact": "/nonexistent/model.gguf"}, "no such file"),
        ("nan", {"latency_ms": math.nan}, "latency_ms is nan"),
        ("negative", {"accuracy": -0.5}, "accuracy is -0.5"),
        ("big-accuracy", {"accuracy": 1.5, "accuracy_ci95": [0.2, 1.7]}, "accuracy is 1.5"),
        ("zero-n", {"n": 0}, "n is 0"),
        ("beam", {"strategy": "beam"}, "strategy 'beam' is not one of"),
    ],
)
def test_serve_refuses_bad_configs_in_one_line(direct_profile, tmp_path, name, changes, says):
    pytest.importorskip("uvicorn")
    config = _config_with(direct_profile, tmp_path, name, **changes)
    assert says in one_line_error(runner.invoke(app, ["serve", "--config", config, "--port", "0"]))
    if name == "beam":  # run too, whichever point its deadline picks (it was a KeyError on that point)
        line = one_line_error(runner.invoke(app, ["run", "2+3", "--config", config, "--deadline-ms", "100000"]))
        assert says in line


def test_serve_and_export_c_refuse_a_config_that_is_not_json(tmp_path):
    pytest.importorskip("uvicorn")
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)))
    assert "not a text file" in one_line_error(runner.invoke(app, ["serve", "--config", str(binary), "--port", "0"]))
    assert "not a text file" in one_line_error(runner.invoke(app, ["export-c", str(binary)]))


def test_serve_on_a_busy_port_says_so(direct_profile):
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = runner.invoke(app, ["serve", "--config", str(direct_profile / "pareto.json"), "--port", str(port)])
    msg = one_line_error(r)
    assert f"127.0.0.1:{port}" in msg and "in use" in msg


def test_serve_prints_where_it_listens(direct_profile):
    pytest.importorskip("uvicorn")
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "edgetts", "serve", "--config", str(direct_profile / "pareto.json"),
                             "--port", "0", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("edgetts serve: listening on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[4]
        assert httpx.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


def test_doctor_names_the_extra_to_install():
    from edgetts.doctor import _engine

    e = _engine("onnx-genai", "edgetts_no_such_module", "onnxruntime-genai")
    assert not e["available"] and "pip install 'edgetts[onnx]'" in e["detail"]
    assert "ModuleNotFoundError" not in e["detail"]
    assert "edgetts[http]" in _engine("openai-http", "edgetts_no_such_module", "httpx")["detail"]


def test_pictures_never_replace_a_users_file(direct_profile, tmp_path):
    mine = tmp_path / "c.png"
    mine.write_text("my own picture")
    args = ["pareto", str(direct_profile), "--out", str(tmp_path / "c.json"), "--accept-unvalidated"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "no pictures" in r.output and mine.read_text() == "my own picture"
    mine.unlink()
    for _ in range(2):  # pictures edgetts wrote are replaced
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "no pictures" not in r.output and mine.read_bytes().startswith(b"\x89PNG")


def test_json_nested_past_python_s_recursion_is_a_one_line_error(small_profile, tmp_path):
    """json.loads raises RecursionError (not a ValueError) on deep nesting: every file a user hands
    edgetts (a config, a dataset, a profile's files, --constraints) is refused in one line."""
    import shutil

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    (tmp_path / "data.jsonl").write_text(deep + "\n")
    prof = tmp_path / "prof"
    shutil.copytree(small_profile, prof, ignore=shutil.ignore_patterns(".edgetts-lock"))
    (prof / "summary.json").write_text(deep)
    (prof / "models.json").write_text(deep)
    cases = [(["run", "--config", str(tmp_path / "config.json"), "--deadline-ms", "100", "q"], "nested too deep"),
             (["profile", "--dataset", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "o")], "nested too deep"),
             (["pareto", str(prof), "--out", str(tmp_path / "c.json")], "unreadable profile file"),
             (["calibrate", str(prof), "--out", str(tmp_path / "c")], "models.json is damaged"),
             (["pareto", str(small_profile), "--out", str(tmp_path / "c.json"), "--constraints",
               "[" * 3000 + "]" * 3000], "--constraints is not valid JSON")]  # fmt: skip
    for args, says in cases:
        assert says in one_line_error(runner.invoke(app, args)), args


def test_yaml_aliases_that_expand_to_billions_of_values_are_refused(tmp_path):
    """A YAML alias is a reference: ten lines of aliases stand for 10^9 values, which the sweep's digest
    (json.dumps) expanded until memory ran out. A sweep or recipe file is refused in one line instead, as is
    one that holds itself; a few aliases, as people use them, still load."""
    bomb = "engine:\n  options:\n    l0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"    l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    (tmp_path / "bomb.yaml").write_text(bomb)
    (tmp_path / "cycle.yaml").write_text("engine:\n  options:\n    a: &a [*a]\n")
    (tmp_path / "recipe.yaml").write_text("gguf: &q [" + ", ".join(["*q"] * 3) + "]\n")
    (tmp_path / "fine.yaml").write_text("budgets: &b [16]\nn: [1]\nstrategies: [single]\nlimit: 2\n"
                                        "engine:\n  options: {a: *b, b: *b}\n")  # fmt: skip
    for args in (["profile", "--config", str(tmp_path / "bomb.yaml")],
                 ["profile", "--config", str(tmp_path / "cycle.yaml")],
                 ["quantize", "tiny", "--recipe", str(tmp_path / "recipe.yaml")]):  # fmt: skip
        assert "more than 100,000 values once its aliases" in one_line_error(
            runner.invoke(app, [*args, "--out", str(tmp_path / "o")])), args
    from edgetts.profiling.config import SweepConfig

    assert SweepConfig.from_yaml(tmp_path / "fine.yaml").budgets == [16]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_an_output_that_is_a_fifo_is_refused_not_waited_on(small_profile, tmp_path):
    """Checking whether an existing output is edgetts' own reads it: a named pipe there blocked pareto
    until someone wrote to it."""
    os.mkfifo(tmp_path / "out")
    for args in (["pareto", str(small_profile), "--out", str(tmp_path / "out"), "--accept-unvalidated"],
                 ["export-c", str(small_profile / "pareto.json"), "--out", str(tmp_path / "out")]):  # fmt: skip
        assert "exists and is not a regular file" in one_line_error(runner.invoke(app, args)), args


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("name", ["records.jsonl", "models.json", ".edgetts-lock"])
def test_a_named_pipe_in_a_profile_directory_is_refused_not_waited_on(small_profile, tmp_path, name):
    """Resuming, merging or calibrating a profile reads its files: a named pipe in place of one blocked the
    command (and the lock's was an OSError traceback)."""
    import shutil

    prof = tmp_path / "prof"
    shutil.copytree(small_profile, prof, ignore=shutil.ignore_patterns(".edgetts-lock"))
    (prof / name).unlink(missing_ok=True)
    os.mkfifo(prof / name)
    commands = [["profile", "--out", str(prof), *SMALL]]
    if name != ".edgetts-lock":  # merge and calibrate read a profile without taking its lock
        commands += [["merge", str(prof), "--out", str(tmp_path / "m")],
                     ["calibrate", str(prof), "--out", str(tmp_path / "c")]]  # fmt: skip
    for args in commands:
        line = one_line_error(runner.invoke(app, args))
        assert "not a regular file" in line and name in line, (args, line)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_config_that_is_a_fifo_is_refused_as_such(tmp_path):
    os.mkfifo(tmp_path / "pareto.json")
    line = one_line_error(runner.invoke(app, ["run", "--config", str(tmp_path / "pareto.json"), "--deadline-ms",
                                              "100", "2+3"]))  # fmt: skip
    assert "not a regular file" in line


@pytest.mark.parametrize(
    "change, says",
    [
        ({"shard": "abc"}, "its shard is not [I, N]"),  # merge sorted shards by it: a TypeError traceback
        ({"shard": [3, 2]}, "its shard is not [I, N]"),  # was merged as shard 3 of 2
        ({"shard": [1, 2, 3]}, "its shard is not [I, N]"),
        ({"sweep": 5}, "it holds no sweep"),
        ({"sweep": {"budgets": "x"}}, "its sweep: budgets"),  # calibrate: a ConfigError traceback
        ({"sweep": {"engine": "x"}}, "its sweep: engine"),  # calibrate: an AttributeError traceback
        ({"sweep": {"dataset": 5}}, "its sweep: dataset"),
        ({"sweep": {"seed": -1}}, "its sweep: seed"),
    ],
)
def test_a_sweep_file_that_is_not_what_profile_writes_is_refused_by_merge_and_calibrate(
    small_profile, tmp_path, change, says
):
    import shutil

    prof = tmp_path / "prof"
    shutil.copytree(small_profile, prof, ignore=shutil.ignore_patterns(".edgetts-lock"))
    sweep = json.loads((prof / "sweep.json").read_text())
    for key, value in change.items():
        sweep[key] = {**sweep[key], **value} if isinstance(value, dict) else value
    (prof / "sweep.json").write_text(json.dumps(sweep))
    for args in (["merge", str(prof), "--out", str(tmp_path / "m")],
                 ["calibrate", str(prof), "--out", str(tmp_path / "c")]):  # fmt: skip
        line = one_line_error(runner.invoke(app, args))
        assert "sweep.json is damaged" in line and says in line, (args, line)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_a_sweep_file_s_seed_and_dataset_are_checked_before_anything_runs(tmp_path):
    for text, says in (("seed: x", "seed: expected a whole number"), ("seed: 1.5", "seed: expected"),
                       ("dataset: 5", "dataset: expected"), ("engine: x", "engine: expected a mapping")):  # fmt: skip
        (tmp_path / "s.yaml").write_text(text + "\n")
        line = one_line_error(runner.invoke(app, ["profile", "--config", str(tmp_path / "s.yaml"), "--out",
                                                  str(tmp_path / "p")]))  # fmt: skip
        assert says in line, (text, line)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("entry", [5, {"artifact": "tiny", "sha256": 5}, {"artifact": "tiny", "sha256": "x" * 64},
                                   {"artifact": "tiny", "bytes": -1}, {"sha256": "0" * 64}])  # fmt: skip
def test_a_models_file_that_is_not_what_profile_writes_is_refused(small_profile, tmp_path, entry):
    import shutil

    prof = tmp_path / "prof"
    shutil.copytree(small_profile, prof, ignore=shutil.ignore_patterns(".edgetts-lock"))
    (prof / "models.json").write_text(json.dumps({"tiny": entry}))  # 5 was an AttributeError traceback
    for args in (["merge", str(prof), "--out", str(tmp_path / "m")],
                 ["calibrate", str(prof), "--out", str(tmp_path / "c")]):  # fmt: skip
        line = one_line_error(runner.invoke(app, args))
        assert "models.json is damaged (model 'tiny'" in line, (args, line)


@pytest.mark.parametrize("check", ["garbage", "{}", '{"ok": "yes"}', '{"ok": true, "mape": NaN, "cells_checked": 3}'])
def test_a_damaged_latency_check_counts_as_failed_not_as_absent(small_profile, tmp_path, check):
    """A pooled profile's latencies are modelled: its direct check is what pareto trusts them by. A damaged
    check file was left out of the summary (the profile then looked like one that needs none), and merge
    died on one with fields missing (a KeyError traceback)."""
    import shutil

    prof = tmp_path / "prof"
    shutil.copytree(small_profile, prof, ignore=shutil.ignore_patterns(".edgetts-lock"))
    (prof / "latency-validation-tiny.json").write_text(check)
    r = runner.invoke(app, ["merge", str(prof), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())["latency_validation"]
    assert summary["ok"] is False and "latency-validation-tiny-part0.json" in summary["models"][0]["damaged"]
    line = one_line_error(runner.invoke(app, ["pareto", str(tmp_path / "m"), "--out", str(tmp_path / "c.json")]))
    assert "its latency check is damaged" in line
    r = runner.invoke(app, ["pareto", str(tmp_path / "m"), "--out", str(tmp_path / "c.json"), "--accept-unvalidated"])
    assert r.exit_code == 0, r.output
