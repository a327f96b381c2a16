import json
import unicodedata

import pytest
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.cli_display import shown

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    assert "doctor" in r.output and "evaluate" in r.output


def test_doctor_json_reports_builtin_model_and_engines():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert rep["builtin"]["models"]["tiny"]["exists"]
    assert rep["builtin"]["benchmarks"]["arith"]["exists"]
    llama = next(e for e in rep["engines"] if e["name"] == "llama.cpp")
    assert llama["available"] and llama["version"]
    assert {s["name"] for s in rep["energy_sources"]} == {"nvml", "jetson", "rapl"}
    assert all(s["detail"] for s in rep["energy_sources"])


def test_doctor_table():
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0 and "energy sources" in r.output


def test_evaluate_json_on_tiny_model():
    r = runner.invoke(app, ["evaluate", "--limit", "5", "--n", "2", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [lv["level"] for lv in res["levels"]] == [1, 2, 3, 4, 5]
    assert all(lv["problems"] == 1 for lv in res["levels"])
    assert res["levels"][0]["single"] > 0  # the easiest problems are solved
    assert res["levels"][-1]["cut_budget"] >= 1


def _one_line_error(r):
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_bad_dataset_is_exit_2_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{oops\n')
    r = runner.invoke(app, ["evaluate", "--dataset", str(bad)])
    assert "bad.jsonl:2" in _one_line_error(r)


def test_bad_models_are_exit_2(tmp_path):
    assert "no such file" in _one_line_error(runner.invoke(app, ["evaluate", "--model", str(tmp_path / "x.gguf")]))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert "not a GGUF file" in _one_line_error(runner.invoke(app, ["evaluate", "--model", str(junk)]))
    assert "is a directory" in _one_line_error(runner.invoke(app, ["evaluate", "--model", str(tmp_path)]))


def test_bad_options_are_exit_2():
    assert runner.invoke(app, ["evaluate", "--n", "0"]).exit_code == 2
    assert "unknown family" in _one_line_error(runner.invoke(app, ["evaluate", "--family", "gpt5"]))


@pytest.mark.parametrize("args, reason", [
    (["--budgets", "16,16"], "budgets: 16 is given twice"),  # its cells were measured twice, into one record
    (["--n", "1,4,1"], "n: 1 is given twice"),
    (["--strategies", "single,single"], "strategies: 'single' is given twice"),
    (["--model", "tiny", "--model", "tiny"], "models: 'tiny' is given twice"),
    (["--strategies", ""], "strategies: expected a non-empty list"),  # not the default grid
    (["--budgets", ""], "budgets: expected a non-empty list"),
])
def test_a_sweep_that_lists_a_value_twice_or_nothing_is_refused(tmp_path, args, reason):
    r = runner.invoke(app, ["profile", "--out", str(tmp_path / "p"), "--quiet", *args])
    assert reason in _one_line_error(r) and not (tmp_path / "p").exists()


def test_a_manifest_that_lists_a_model_twice_is_refused(tmp_path):
    """The same file twice (a manifest listing it twice, or it beside a manifest holding it) was measured
    twice into one record key each, and the directory then refused its own duplicate records."""
    import hashlib
    import shutil

    from edgetts.models import BUILTIN

    shutil.copyfile(BUILTIN["tiny"], tmp_path / "tiny.gguf")
    entry = {"path": "tiny.gguf", "format": "gguf", "sha256": hashlib.sha256((tmp_path / "tiny.gguf").read_bytes())
             .hexdigest(), "bytes": (tmp_path / "tiny.gguf").stat().st_size, "type": "f16"}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "edgetts.manifest/v1", "artifacts": [entry]}))
    sweep = ["profile", "--out", str(tmp_path / "p"), "--limit", "2", "--budgets", "16", "--strategies", "single"]
    twice = [*sweep, "--model", str(tmp_path / "manifest.json"), "--model", str(tmp_path / "tiny.gguf")]
    assert "tiny.gguf comes twice" in _one_line_error(runner.invoke(app, twice))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "edgetts.manifest/v1", "artifacts": [entry, entry]}))
    assert "comes twice" in _one_line_error(runner.invoke(app, [*sweep, "--model", str(tmp_path / "manifest.json")]))
    assert not (tmp_path / "p").exists()


def test_a_sweep_file_with_a_temperature_that_is_not_a_number_is_refused(tmp_path):
    for t in (".nan", ".inf", "-1"):
        (tmp_path / "s.yaml").write_text(f"temperature: {t}\n")
        r = runner.invoke(app, ["profile", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "p")])
        assert "temperature: expected a number >= 0" in _one_line_error(r)
    r = runner.invoke(app, ["run", "--temperature", "inf", "--n", "1", "2+2"])
    assert _one_line_error(r) == "error: temperature must be a finite number >= 0, got inf"


def test_run_prints_answer_and_trace():
    r = runner.invoke(app, ["run", "Evaluate left to right: 12+7*3", "--strategy", "majority", "--n", "4"])
    assert r.exit_code == 0, r.output
    answer, summary = r.stdout.strip().splitlines()[:2]
    assert answer == "57"
    assert summary.startswith("majority: 4 row(s)") and "votes 57:" in summary


def test_answers_that_hold_control_characters_are_shown_escaped():
    # at a huge temperature the tiny model samples byte tokens: NULs and other control characters in the votes
    r = runner.invoke(app, ["run", "1+1", "--temperature", "1e300", "--n", "8", "--budget", "64"])
    assert r.exit_code == 0, r.output
    said = json.loads(runner.invoke(app, ["run", "1+1", "--temperature", "1e300", "--n", "8", "--budget", "64",
                                          "--json"]).stdout)  # fmt: skip
    raw = "".join(said["votes"])
    assert any(unicodedata.category(c) == "Cc" for c in raw)  # the case this test is about
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in r.stdout.replace("\n", ""))
    assert shown("a\x1b[2J\x00\udc80 é") == "a\\x1b[2J\\x00\\udc80 é" and shown("57") == "57"


def test_run_json_with_deadline():
    r = runner.invoke(app, ["run", "Evaluate left to right: 8*4-3", "--strategy", "esc", "--deadline-ms", "2000",
                            "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)
    assert t["answer"] == "29" and t["deadline_met"] is True and t["strategy"] == "esc"


def test_a_one_row_strategy_forced_on_a_config_point_says_it_ran_one_row(small_profile, tmp_path):
    """--strategy single on a point of several rows runs one row; it reported the point's n."""
    config = json.loads((small_profile / "pareto.json").read_text())
    top = config["frontier"][-1]
    top.update(strategy="majority", n=4, id=top["id"].replace("/single/n1/", "/majority/n4/"))
    (tmp_path / "c.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["run", "Evaluate left to right: 8*4-3", "--config", str(tmp_path / "c.json"),
                            "--deadline-ms", "100000", "--strategy", "single", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)
    assert t["point"]["id"] == top["id"]  # the most accurate point: four rows
    assert t["point"]["ran"]["strategy"] == "single" and t["point"]["ran"]["n"] == 1 and len(t["rows"]) == 1


def test_run_rejects_bad_choices():
    msg = _one_line_error(runner.invoke(app, ["run", "q", "--strategy", "beam"]))
    assert "choose one of: single, budget-forcing, length-hint, majority" in msg
    assert runner.invoke(app, ["run", "q", "--n", "0"]).exit_code == 2
    assert runner.invoke(app, ["run", "q", "--budget", "-3"]).exit_code == 2
    assert "unknown family" in _one_line_error(runner.invoke(app, ["run", "q", "--family", "gpt5"]))
