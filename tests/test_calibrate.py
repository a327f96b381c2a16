"""Profile once, deploy anywhere: calibrate to a setting, settings as an axis, shards and merge."""

import json
import os
import shutil
import stat

import pytest
from conftest import DIRECT, SMALL, one_line_error
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.profiling.records import RecordLog
from edgetts.profiling.runner import ProfileError
from edgetts.profiling.shards import _missing, parse_shard

runner = CliRunner()
Q = "Evaluate left to right: 8*4-3"
UNTIMED = {"latency_s", "ttft_s", "tpot_s", "energy_j", "avg_power_w", "peak_rss_mb", "peak_gpu_mb"}


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".edgetts-lock"))
    return dst


def _accuracy(d):
    return {(c["strategy"], c["n"], c["budget"]): (c["accuracy"], c["accuracy_ci95"], c["queries"])
            for c in json.loads((d / "summary.json").read_text())["cells"]}  # fmt: skip


def test_calibrate_keeps_the_accuracy_and_measures_this_setting(small_profile, tmp_path):
    out = tmp_path / "cal"
    r = runner.invoke(app, ["calibrate", str(small_profile), "--out", str(out), "--setting", "threads=1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert _accuracy(out) == _accuracy(small_profile)  # the source's accuracy and intervals, exactly
    src, cal = RecordLog(small_profile / "records.jsonl").load(), RecordLog(out / "records.jsonl").load()
    assert src.keys() == cal.keys()
    for key, rec in cal.items():
        assert rec["mode"] == "calibrated" and rec["latency_s"] > 0 and rec["profiled_with"]["threads"] == 1
        assert {k: v for k, v in rec.items() if k in ("correct", "generated_tokens", "rounds")} == {
            k: v for k, v in src[key].items() if k in ("correct", "generated_tokens", "rounds")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latency_validation"]["cells_checked"] == 1  # checked directly, as pooled profiles are
    check = summary["latency_validation"]["models"][0]
    cells = {(c["strategy"], c["n"], c["budget"]) for c in json.loads((out / "summary.json").read_text())["cells"]}
    assert {(a["strategy"], a["n"], a["budget"]) for a in check["anchors"]} == cells  # every cell anchored
    assert all(a["problems"] >= 1 and a["factor"] > 0 for a in check["anchors"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["calibrated_from"]["profile"] == str(small_profile) and (out / "pareto.json").is_file()


def test_a_calibration_whose_check_fails_measures_again_once(small_profile, tmp_path, monkeypatch):
    """The device changed speed while a calibration measured (its own check fails): it measures again once,
    and a second failure is kept and said, as the first would have been."""
    from edgetts.profiling import validation

    real, warned = validation.validate, []

    def failing(times):
        def check(*args, **kw):
            result = real(*args, **kw)
            warned.append(kw.get("warn"))
            return {**result, "ok": False, "drift": 0.5} if len(warned) <= times else result

        return check

    for times, ok in ((1, True), (2, False)):
        warned.clear()
        monkeypatch.setattr(validation, "validate", failing(times))
        out = tmp_path / f"cal{times}"
        r = runner.invoke(app, ["calibrate", str(small_profile), "--out", str(out), "--setting", "threads=1",
                                "--anchor-s", "1", "--quiet"])  # fmt: skip
        assert r.exit_code == 0, r.output
        check = json.loads((out / "summary.json").read_text())["latency_validation"]["models"][0]
        assert warned == [False, True] and check["attempts"] == 2  # only the last measurement warns
        if not ok:
            assert check["ok"] is False and check["drift"] == 0.5


def test_each_cell_gets_its_own_factor_pulled_toward_the_median():
    from edgetts.profiling.calibrate import ANY, SHRINK, cell_factors

    pairs = {("single", 1, 64): [(2.0, 1.0)] * 8,  # this shape runs 2x its model here
             ("majority", 8, 64): [(3.0, 1.0)] * 8 + [(40.0, 1.0)],  # 3x, and one call stalled by another process
             ("esc", 4, 64): [(2.5, 1.0)], ("esc", 8, 64): []}  # fmt: skip
    f = cell_factors(pairs)
    assert f[ANY] == 2.5  # the median of the cells' own factors
    assert f[("single", 1, 64)] == pytest.approx((2.0 * 8 + 2.5 * SHRINK) / (8 + SHRINK))
    assert f[("majority", 8, 64)] == pytest.approx((3.0 * 8 + 2.5 * SHRINK) / (8 + SHRINK))  # the stall left out
    assert f[("esc", 4, 64)] == pytest.approx(2.5) and ("esc", 8, 64) not in f  # no anchor: ANY applies
    assert cell_factors({}) == {ANY: 1.0}


def test_each_cell_gets_the_tail_its_anchors_showed():
    """Under a CPU quota a call is stalled now and then by a throttled period, whatever its length: a cell's
    calibrated times are its modelled ones spread by the deviations its anchors showed (centred: the
    mean stays its factor's), so their p95 has the tail a direct profile there shows, where factor x
    modelled seconds alone had none; a record keeps its place in the cell's order."""
    from statistics import mean, quantiles

    from edgetts.profiling.calibrate import ANY, SPREAD_MIN, cell_factors, cell_spread, spread_cell

    cell = ("single", 1, 32)
    stalls = [0.0, 0.0, 0.0, 0.010, 0.0, 0.0, 0.008, 0.0, 0.0, 0.0]  # 10 ms periods now and then
    pairs = {cell: [(2 * 0.010 + s, 0.010) for s in stalls] + [(1.0, 0.010)],  # and one stalled by another process
             ("esc", 4, 32): [(0.05, 0.02)] * (SPREAD_MIN - 1)}  # too few calls for a spread of its own
    factors = cell_factors(pairs)
    spread = cell_spread(pairs, factors)
    assert len(spread[cell]) == len(stalls) and abs(sum(spread[cell])) < 1e-12  # the 1 s call left out; centred
    assert ("esc", 4, 32) not in spread and len(spread[ANY]) == len(stalls) + SPREAD_MIN - 1
    assert max(spread[cell]) == pytest.approx(0.010 - sum(stalls) / len(stalls))  # a stall, less the mean one

    scaled = {f"p{i}": factors[cell] * (0.008 + 0.004 * (i % 7) / 6) for i in range(50)}  # 8-12 ms modelled
    timed = spread_cell(scaled, spread[cell])
    p95 = quantiles(timed.values(), n=20)[-1]
    assert p95 > 1.2 * quantiles(scaled.values(), n=20)[-1]
    assert mean(timed.values()) == pytest.approx(mean(scaled.values()), rel=0.03)
    order = sorted(scaled, key=lambda k: (scaled[k], k))
    assert [timed[k] for k in order] == sorted(timed.values())  # longer rows, longer times
    assert all(timed[k] >= scaled[k] / 2 for k in scaled)
    assert spread_cell(scaled, [0.0]) == scaled  # no deviations seen: the times as modelled


def test_a_record_spread_below_its_model_keeps_its_first_token_before_its_end():
    """A calibrated record's time is its modelled one plus a drawn deviation, which may be negative; its
    first token (each round's) still comes before its end and its time per token is not negative (a
    quick record had a 6.0 ms first token in a 5.6 ms query)."""
    from edgetts.profiling.calibrate import _replayed
    from edgetts.profiling.latency import StepModel

    steps = StepModel(a=1e-4, b=2e-5, c=0.0, token_s=2e-4)
    rec = {"prompt_tokens": 20, "rounds": [[[26, False]]], "strategy": "single", "n": 1, "budget": 128}
    for rounds in ([[[26, False]]], [[[8, False], [9, False]], [[12, True]]]):
        modelled = _replayed({**rec, "rounds": rounds}, steps, 4, 1.0)["latency_s"]
        for extra in (0.0, -0.4 * modelled):
            r = _replayed({**rec, "rounds": rounds}, steps, 4, 1.0, extra)
            assert r["latency_s"] == pytest.approx(modelled + extra)
            assert r["ttft_s"] * len(rounds) <= r["latency_s"] + 1e-12 and r["tpot_s"] >= 0


def test_calibrate_refuses_what_it_cannot_re_time(small_profile, tmp_path):
    src = _copy(small_profile, tmp_path / "src")
    args = ["calibrate", str(src), "--quiet"]
    assert "is the source profile" in one_line_error(runner.invoke(app, [*args, "--out", str(src)]))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "not a profile directory" in one_line_error(runner.invoke(app, [*args, "--out", str(busy)]))
    assert (busy / "notes.txt").read_text() == "mine"
    for bad in ("threads=0", "cores=2", "threads=two", "threads"):
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--setting", bad])
        assert "--setting" in one_line_error(r)
    models = json.loads((src / "models.json").read_text())
    models["tiny"]["sha256"] = "0" * 64
    (src / "models.json").write_text(json.dumps(models))
    assert "sha256 differs" in one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "o1")]))
    (src / "models.json").unlink()
    assert "does not record the sha256" in one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "o2")]))
    lines = (src / "records.jsonl").read_text().splitlines()
    old = [json.dumps({k: v for k, v in json.loads(line).items() if k != "rounds"}) for line in lines]
    (src / "records.jsonl").write_text("\n".join(old) + "\n")
    line = one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "o3")]))
    assert f"{len(lines)} of {len(lines)} records lack per-row token counts" in line
    assert not any((tmp_path / f"o{k}").exists() for k in (1, 2, 3))  # nothing left behind


def test_every_model_is_found_before_anything_is_measured(small_profile, tmp_path):
    """A profile of two variants: each file is looked for in --model-dir, then where the source had it (a
    built-in model where edgetts is installed); one missing refuses the calibration before any of it runs."""
    from edgetts.models import BUILTIN

    src = _copy(small_profile, tmp_path / "src")
    twin = tmp_path / "files" / "twin.gguf"  # the same weights under another name: a second variant
    twin.parent.mkdir()
    shutil.copyfile(BUILTIN["tiny"], twin)
    records = RecordLog(src / "records.jsonl").load()
    log = RecordLog(src / "records.jsonl")
    for rec in records.values():
        log.append(dict(rec, model=str(twin), key=rec["key"].replace("tiny", str(twin), 1),
                        engine=dict(rec["engine"], artifact=str(twin))))  # fmt: skip
    models = json.loads((src / "models.json").read_text())
    models[str(twin)] = dict(models["tiny"], artifact=str(twin))
    (src / "models.json").write_text(json.dumps(models))
    moved = tmp_path / "moved"
    moved.mkdir()
    twin.rename(moved / twin.name)
    args = ["calibrate", str(src), "--anchor-s", "0", "--quiet"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "ok"), "--model-dir", str(moved)])
    assert r.exit_code == 0, r.output  # twin.gguf from --model-dir, tiny where edgetts keeps it
    models = {json.loads(line)["model"] for line in (tmp_path / "ok" / "records.jsonl").read_text().splitlines()}
    assert models == {"tiny", str(twin)}
    assert "no such model file" in one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "gone")]))
    assert not (tmp_path / "gone").exists()  # nothing measured, nothing left behind
    line = one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--model-dir", str(tmp_path / "x")]))
    assert "no such folder" in line
    line = one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--artifact", str(twin)]))
    assert "--artifact names the file of a model the source measured through a server" in line


@pytest.fixture
def fake_jetson(tmp_path, monkeypatch):
    """A Jetson with modes 0 (MAXN), 1 (15W) and 2 (7W): ``nvpmodel -m N`` sets one by its number (a
    name or an unknown number fails, as the real tool does) and ``nvpmodel -q`` prints its name on the
    ``NV Power Mode:`` line and its number on the next."""
    root, bin_ = tmp_path / "root", tmp_path / "bin"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    bin_.mkdir()
    state = tmp_path / "mode"
    state.write_text("0")
    tool = bin_ / "nvpmodel"
    tool.write_text(f"""#!/bin/sh
name() {{ case "$1" in 0) echo MAXN;; 1) echo 15W;; 2) echo 7W;; *) return 1;; esac; }}
if [ "$1" = "-q" ]; then m=$(cat {state}); echo "NV Fan Mode:quiet"; echo "NV Power Mode: $(name $m)"; echo $m; fi
if [ "$1" = "-m" ]; then
  name "$2" >/dev/null || {{ echo "NVPM ERROR: Invalid mode: $2" >&2; exit 1; }}; echo $2 > {state}
fi
""")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("EDGETTS_SYSFS_ROOT", str(root))
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    return state


def test_settings_are_an_axis_power_modes_included(small_profile, tmp_path, fake_jetson):
    r = runner.invoke(app, ["doctor", "--json"])  # the mode a user is in, and the number to give for it
    assert r.exit_code == 0 and "; power mode MAXN (mode 0)" in json.loads(r.stdout)["accelerators"]["jetson"]
    out = tmp_path / "cal"
    r = runner.invoke(app, ["calibrate", str(small_profile), "--out", str(out), "--setting", "power_mode=1",
                            "--setting", "threads=1,power_mode=0", "--switch", "nvpmodel -m {power_mode}",
                            "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    first = next(iter(RecordLog(out / "power_mode=1" / "records.jsonl").load().values()))
    # read back from the device, not taken on trust: the mode's name, and the number it was set by
    assert first["profiled_with"]["power_mode"] == "15W" and first["profiled_with"]["power_mode_id"] == 1
    cfg = tmp_path / "both.json"
    r = runner.invoke(app, ["pareto", str(out / "power_mode=1"), str(out / "threads=1,power_mode=0"), "--out",
                            str(cfg), "--accept-unvalidated"])  # fmt: skip
    assert r.exit_code == 0, r.output
    front = json.loads(cfg.read_text())["frontier"]
    assert all("@" in p["id"] and p["setting"] for p in front)
    assert "Settings compared (2)" in (tmp_path / "both-report.html").read_text()
    # a runtime runs under one setting: a config whose frontier mixes them is refused
    mixed = json.loads(cfg.read_text())
    mixed["frontier"] = [dict(mixed["frontier"][0], profiled_with={"threads": 1, "power_mode": m}, id=f"p{k}",
                              latency_ms=mixed["frontier"][0]["latency_ms"] + k)
                         for k, m in enumerate(("15W", "MAXN"))]  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    line = one_line_error(runner.invoke(app, ["run", "--config", str(tmp_path / "mixed.json"), "--deadline-ms",
                                              "1000", Q]))  # fmt: skip
    assert "profiled under 2 settings (threads=1,power_mode=15W; threads=1,power_mode=MAXN)" in line
    for named in ("15W", "1"):  # one setting's points, the mode asked for by name or by number
        one = tmp_path / f"{named}.json"
        r = runner.invoke(app, ["pareto", str(out / "power_mode=1"), str(out / "threads=1,power_mode=0"), "--out",
                                str(one), "--setting", f"power_mode={named}", "--accept-unvalidated", "--no-plot"])
        assert r.exit_code == 0 and all(p["profiled_with"]["power_mode"] == "15W"
                                        for p in json.loads(one.read_text())["frontier"])  # fmt: skip
    fake_jetson.write_text("0")
    r = runner.invoke(app, ["run", "--config", str(one), "--deadline-ms", "60000", Q])
    assert r.exit_code == 0 and "profiled with power_mode=15W; running with power_mode=MAXN" in r.stderr


def test_a_power_mode_needs_a_switch_that_works(small_profile, tmp_path, fake_jetson, monkeypatch):
    args = ["calibrate", str(small_profile), "--out", str(tmp_path / "o"), "--setting", "power_mode=1", "--quiet"]
    assert "needs --switch" in one_line_error(runner.invoke(app, args))
    assert "failed (exit 3)" in one_line_error(runner.invoke(app, [*args, "--switch", "exit 3"]))
    line = one_line_error(runner.invoke(app, [*args, "--switch", "true"]))  # the mode did not change
    assert "reports power mode 'MAXN' (mode 0), not '1'" in line
    named = ["calibrate", str(small_profile), "--out", str(tmp_path / "o"), "--setting", "power_mode=15W", "--quiet"]
    line = one_line_error(runner.invoke(app, [*named, "--switch", "nvpmodel -m {power_mode}"]))
    assert "failed (exit 1): NVPM ERROR: Invalid mode: 15W" in line  # nvpmodel -m takes the mode's number
    # the mode is one word to the command, never more commands; a command that asks fails, one that hangs ends
    sneaky = tmp_path / "sneaky"
    line = one_line_error(runner.invoke(app, ["calibrate", str(small_profile), "--out", str(tmp_path / "o"),
                                              "--setting", f"power_mode=1;touch {sneaky}", "--switch",
                                              "nvpmodel -m {power_mode}", "--quiet"]))  # fmt: skip
    assert "a power mode is a number or a name" in line and not sneaky.exists()  # refused as a setting
    from edgetts.profiling.power_modes import switch_power_mode

    with pytest.raises(ProfileError, match=f"Invalid mode: 1;touch {sneaky}"):  # and quoted where it is used
        switch_power_mode(f"1;touch {sneaky}", "nvpmodel -m {power_mode}")
    assert not sneaky.exists()
    assert "failed (exit 1)" in one_line_error(runner.invoke(app, [*args, "--switch", "read reboot"]))
    monkeypatch.setattr("edgetts.profiling.power_modes.SWITCH_TIMEOUT_S", 1)
    assert "did not finish in 1 s" in one_line_error(runner.invoke(app, [*args, "--switch", "sleep 30; true"]))
    alone = ["calibrate", str(small_profile), "--out", str(tmp_path / "o"), "--setting", "threads=1", "--switch",
             "nvpmodel -m {power_mode}"]  # fmt: skip
    assert "--switch sets power modes" in one_line_error(runner.invoke(app, alone))
    # braces other than {power_mode} are the shell's; one command for two modes would set neither right
    braces = ["calibrate", str(small_profile), "--out", str(tmp_path / "braces"), "--setting", "power_mode=1",
              "--switch", "awk '{print}' /dev/null && nvpmodel -m {power_mode}", "--quiet", "--anchor-s", "0"]
    r = runner.invoke(app, braces)
    assert r.exit_code == 0, r.output
    # measured in mode 1, and the device is back in the mode it was in before
    assert json.loads((tmp_path / "braces" / "records.jsonl").read_text().splitlines()[0])["profiled_with"][
        "power_mode_id"] == 1
    assert fake_jetson.read_text().strip() == "0" and "power mode set back to MAXN (mode 0)" in r.output
    # a calibration that fails after another switched the mode leaves the device as it found it too
    (tmp_path / "two" / "power_mode=2").mkdir(parents=True)
    (tmp_path / "two" / "power_mode=2" / "mine.txt").write_text("")
    r = runner.invoke(app, ["calibrate", str(small_profile), "--out", str(tmp_path / "two"), "--setting",
                            "power_mode=1", "--setting", "power_mode=2", "--switch", "nvpmodel -m {power_mode}",
                            "--quiet", "--anchor-s", "0"])  # fmt: skip
    assert r.exit_code == 2 and "not a profile directory" in r.output and fake_jetson.read_text().strip() == "0"
    two = [*args, "--setting", "power_mode=2", "--switch", "nvpmodel -m 1"]
    assert "has no {power_mode} in it" in one_line_error(runner.invoke(app, two))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    busy = ["calibrate", str(small_profile), "--out", str(tmp_path / "busy"), "--setting", "power_mode=2", "--switch",
            "nvpmodel -m {power_mode}", "--quiet"]  # fmt: skip
    assert "is not a profile directory" in one_line_error(runner.invoke(app, busy))
    assert fake_jetson.read_text().strip() == "0"  # a refused calibration leaves the device's mode alone
    monkeypatch.setenv("EDGETTS_SYSFS_ROOT", str(tmp_path / "nowhere"))  # no Jetson: the mode cannot be read
    line = one_line_error(runner.invoke(app, [*args, "--switch", "true"]))
    assert "the power mode cannot be read back" in line
    assert not (tmp_path / "o").exists()
    twice = ["calibrate", str(small_profile), "--out", str(tmp_path / "o"), "--setting", "threads=1", "--setting",
             "threads=1", "--quiet"]  # fmt: skip
    assert "--setting threads=1 is given more than once" in one_line_error(runner.invoke(app, twice))
    within = ["calibrate", str(small_profile), "--out", str(tmp_path / "o"), "--setting", "threads=1,threads=2"]
    assert "threads is given twice" in one_line_error(runner.invoke(app, within))
    assert not (tmp_path / "o").exists()  # refused before measuring anything


def test_setting_values():
    from edgetts.profiling.calibrate import parse_setting

    assert parse_setting("threads=2,gpu_layers=-1") == {"threads": 2, "gpu_layers": -1}
    assert parse_setting("power_mode=MAXN_SUPER") == {"power_mode": "MAXN_SUPER"}
    for bad in ("threads=0", "gpu_layers=-2", "threads=2.5", "power_mode=a\nb", "power_mode=1;reboot",
                "power_mode=15 W", "power_mode=" + "x" * 65, "bogus=1", "threads=1,threads=2",
                "gpu_layers=99999999999999999999"):  # fmt: skip
        with pytest.raises(ProfileError, match="--setting"):
            parse_setting(bad)


def test_shard_indices():
    assert parse_shard("1/3") == (1, 3)
    assert parse_shard("3", {"JOB_COMPLETION_INDEX": "2"}) == (2, 3)
    assert parse_shard("4", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3"}) == (2, 4)
    for bad, env in (("3/3", {}), ("-1/2", {}), ("a/b", {}), ("3", {}), ("0/0", {})):
        with pytest.raises(ProfileError, match="--shard"):
            parse_shard(bad, env)
    with pytest.raises(ProfileError, match=r"JOB_COMPLETION_INDEX='abc' .*is not a whole number"):
        parse_shard("3", {"JOB_COMPLETION_INDEX": "abc"})


def test_missing_shards_are_named_without_counting_to_n():
    assert _missing([(0, 3), (2, 3)]) == ["1/3"]
    assert _missing([(1, 2)]) == ["0/2"] and _missing([]) == []
    huge = 10**20  # N comes from a file: a merge must not count to it
    named = [f"0/{huge}", f"2/{huge}", f"3/{huge}"]
    assert _missing([(1, huge)], listed=3) == [*named, f"... and {huge - 4} more of {huge}"]


def test_a_sweep_in_three_shards_merges_into_the_unsplit_sweep(direct_profile, tmp_path):
    parts = []
    for i in range(3):
        d = tmp_path / f"shard{i}"
        r = runner.invoke(app, ["profile", "--out", str(d), "--shard", f"{i}/3", *DIRECT])
        assert r.exit_code == 0, r.output
        parts.append(d)
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", *map(str, parts), "--out", str(merged)])
    assert r.exit_code == 0, r.output
    whole = RecordLog(direct_profile / "records.jsonl").load()
    joined = RecordLog(merged / "records.jsonl").load()
    assert joined.keys() == whole.keys()  # record for record
    for key in whole:
        assert {k: v for k, v in joined[key].items() if k not in UNTIMED} == {
            k: v for k, v in whole[key].items() if k not in UNTIMED}
    assert _accuracy(merged) == _accuracy(direct_profile) and (merged / "pareto.json").is_file()
    # a shard given twice counts once; a missing one is named; another sweep, or the same shard index
    # resumed as another one, is refused
    r = runner.invoke(app, ["merge", str(parts[0]), str(parts[0]), str(parts[1]), "--out", str(tmp_path / "m2")])
    assert r.exit_code == 0 and "shard(s) 2/3 of this sweep were not given" in r.stderr
    assert len(RecordLog(tmp_path / "m2" / "records.jsonl").load()) < len(whole)
    other = tmp_path / "other"
    assert runner.invoke(app, ["profile", "--out", str(other), "--shard", "0/3", *DIRECT, "--seed", "9"]).exit_code == 0
    assert "another sweep" in one_line_error(runner.invoke(app, ["merge", str(parts[1]), str(other), "--out",
                                                                 str(tmp_path / "m3")]))  # fmt: skip
    line = one_line_error(runner.invoke(app, ["profile", "--out", str(parts[0]), "--shard", "1/3", *DIRECT]))
    assert "holds shard 0/3 of this sweep, not 1/3" in line
    assert "not empty" in one_line_error(runner.invoke(app, ["merge", *map(str, parts), "--out", str(merged)]))


def test_the_shard_index_comes_from_the_scheduler(tmp_path, monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    d = tmp_path / "k8s"
    assert runner.invoke(app, ["profile", "--out", str(d), "--shard", "2", *SMALL, "--mode", "direct"]).exit_code == 0
    assert json.loads((d / "sweep.json").read_text())["shard"] == [1, 2]


def test_merge_joins_only_shards_timed_alike_and_says_when_settings_differ(small_profile, tmp_path, monkeypatch):
    """A calibration's records carry another device's or setting's latencies: joined with measured shards
    (or a calibration to another setting), each cell would mix them silently.  Measured shards from
    machines of other settings join (the accuracy is the artifact's), said in a warning."""
    cal = tmp_path / "cal"
    threads = next(iter(RecordLog(small_profile / "records.jsonl").load().values()))["profiled_with"]["threads"]
    r = runner.invoke(app, ["calibrate", str(small_profile), "--out", str(cal), "--setting", f"threads={threads}",
                            "--anchor-s", "0", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    line = one_line_error(runner.invoke(app, ["merge", str(small_profile), str(cal), "--out", str(tmp_path / "m")]))
    assert f"is a calibration to threads={threads}" in line and "is measured" in line
    assert not (tmp_path / "m").exists()
    # nor does a Pareto config take one point twice (the source and its calibration to the source's setting)
    line = one_line_error(runner.invoke(app, ["pareto", str(small_profile), str(cal), "--out", str(tmp_path / "c.json"),
                                              "--accept-unvalidated"]))  # fmt: skip
    assert "is measured in both" in line and "under the same setting" in line
    line = one_line_error(runner.invoke(app, ["pareto", str(cal), "--out", str(tmp_path / "c.json"), "--setting", "",
                                              "--accept-unvalidated"]))  # fmt: skip
    assert line.startswith("error: --setting ''")  # an empty setting kept every setting's points
    parts = []
    for i in range(2):
        monkeypatch.setenv("EDGETTS_THREADS", str(i + 1))  # machines whose defaults differ
        parts.append(tmp_path / f"shard{i}")
        assert runner.invoke(app, ["profile", "--out", str(parts[-1]), "--shard", f"{i}/2", *DIRECT]).exit_code == 0
    r = runner.invoke(app, ["merge", *map(str, parts), "--out", str(tmp_path / "joined")])
    assert r.exit_code == 0 and "measured under different settings (threads=1" in r.stderr, r.output
    sweep = json.loads((tmp_path / "joined" / "sweep.json").read_text())
    assert [s.split(",")[0] for s in sweep["mixed_settings"]] == ["threads=1", "threads=2"]


def test_reading_another_run_s_profile_changes_nothing_and_damage_is_one_line(small_profile, tmp_path):
    """calibrate and merge read a profile that a running edgetts profile may still be appending to: a
    partial last line is that run's write in progress, left as it is (the profile's own run, which holds
    the lock, cuts it); damaged files are one line each, not a traceback."""
    src = _copy(small_profile, tmp_path / "src")
    records = src / "records.jsonl"
    partial = records.read_bytes() + b'{"key": "tiny|single|n1|b32|r0|arith-L5-00'  # a line being written
    records.write_bytes(partial)
    r = runner.invoke(app, ["calibrate", str(src), "--out", str(tmp_path / "cal"), "--anchor-s", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", str(src), "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert records.read_bytes() == partial  # the writer's line in progress is still there to be finished
    assert len(RecordLog(tmp_path / "merged" / "records.jsonl").load()) == len(RecordLog(records).load(repair=False))

    lines = partial.decode().splitlines(keepends=True)[:-1]
    first = json.loads(lines[0])
    cases = {"rounds": dict(first, rounds=[[1e308, "x"]]), "prompt": dict(first, prompt_tokens="32"),
             "cell": {k: v for k, v in first.items() if k != "budget"}}  # fmt: skip
    for name, bad in cases.items():
        records.write_text(json.dumps(bad) + "\n" + "".join(lines[1:]))
        line = one_line_error(runner.invoke(app, ["calibrate", str(src), "--out", str(tmp_path / name), "--quiet"]))
        assert "damaged" in line and first["key"] in line, name
    # values a summary reads that edgetts never writes: refused where the log is read, by every command
    values = {"nan": first["latency_s"] and json.dumps(first).replace(json.dumps(first["latency_s"]), "NaN", 1),
              "huge": json.dumps(dict(first, latency_s=1.0)).replace('"latency_s": 1.0', '"latency_s": 1e999'),
              "text": json.dumps(dict(first, latency_s="fast")), "guess": json.dumps(dict(first, correct="yes")),
              "lost": json.dumps({k: v for k, v in first.items() if k != "peak_rss_mb"})}  # fmt: skip
    for name, bad in values.items():
        records.write_text(bad + "\n" + "".join(lines[1:]))
        for args in (["calibrate", str(src), "--out", str(tmp_path / name), "--quiet"],
                     ["merge", str(src), "--out", str(tmp_path / name)]):  # fmt: skip
            line = one_line_error(runner.invoke(app, args))
            assert "records.jsonl:1: damaged record" in line, (name, line)
    records.write_text("".join(lines))
    (src / "models.json").write_text("[1, 2")
    for args in (["calibrate", str(src), "--out", str(tmp_path / "m1")], ["merge", str(src), "--out",
                                                                          str(tmp_path / "m2")]):  # fmt: skip
        assert "models.json is damaged" in one_line_error(runner.invoke(app, args))
    for summary in ('{"cells": "x"}', "[]", '{"cells": [{"strategy": "single"}]}'):
        (src / "summary.json").write_text(summary)
        line = one_line_error(runner.invoke(app, ["pareto", str(src), "--out", str(tmp_path / "c.json")]))
        assert "damaged" in line and "run edgetts profile on it again" in line
    assert not any((tmp_path / n).exists() for n in (*cases, *values, "m1", "m2", "c.json"))


def test_a_profile_measured_through_a_server_is_timed_here_on_its_file(tiny_server, tmp_path, caplog):
    """Accuracy measured once through an OpenAI-compatible server (the same GGUF behind it), time measured
    here on the file: the served name finds a built-in model, --artifact names any file; nothing can
    check it is the file the server ran (no sha256 there), and the calibration says and records so."""
    from edgetts.models import BUILTIN

    src = tmp_path / "http"
    r = runner.invoke(app, ["profile", "--engine", "openai-http", "--url", tiny_server + "/v1", "--model", "tiny",
                            "--strategies", "single,majority", "--budgets", "32", "--n", "2", "--mode", "direct",
                            "--limit", "6", "--quiet", "--out", str(src)])  # fmt: skip
    assert r.exit_code == 0, r.output
    copy = tmp_path / "files" / "mine.gguf"
    copy.parent.mkdir()
    shutil.copyfile(BUILTIN["tiny"], copy)
    for out, extra in (("by-name", []), ("by-file", ["--artifact", str(copy)])):
        caplog.clear()
        r = runner.invoke(app, ["calibrate", str(src), "--out", str(tmp_path / out), "--anchor-s", "0", "--quiet",
                                *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert "was measured through a server: nothing can check" in caplog.text
        recs = RecordLog(tmp_path / out / "records.jsonl").load()
        assert all(rec["engine"]["engine"] == "llama.cpp" and rec["source_model"].startswith("openai-http:tiny@")
                   for rec in recs.values())  # fmt: skip
        assert _accuracy(tmp_path / out) == _accuracy(src)
        [(_, files)] = json.loads((tmp_path / out / "sweep.json").read_text())["calibrated_from"]["artifacts"].items()
        assert files["artifact_checked"] is False
    front = json.loads((tmp_path / "by-file" / "pareto.json").read_text())["frontier"]
    assert all(p["engine"] == "llama.cpp" and p["id"].startswith("mine/") for p in front)
    # the file is then known by its sha256: calibrating the calibration checks it as any local profile's
    caplog.clear()
    r = runner.invoke(app, ["calibrate", str(tmp_path / "by-file"), "--out", str(tmp_path / "again"), "--anchor-s",
                            "0", "--quiet"])  # fmt: skip
    assert r.exit_code == 0 and "nothing can check" not in caplog.text, r.output
    for bad, said in ((["--artifact", str(tmp_path / "none.gguf")], "no such file"),
                      (["--artifact", f"other={copy}", "--artifact", str(copy)], "is given twice")):  # fmt: skip
        line = one_line_error(runner.invoke(app, ["calibrate", str(src), "--out", str(tmp_path / "x"), *bad]))
        assert said in line, line
    # two servers' models that would run here as one file: refused, not one model's records over the other's
    two = _copy(src, tmp_path / "two")
    log = RecordLog(two / "records.jsonl")
    for rec in RecordLog(src / "records.jsonl").load().values():
        other = rec["model"].replace(tiny_server, "http://127.0.0.1:9")
        log.append(dict(rec, model=other, key=rec["key"].replace(rec["model"], other),
                        engine=dict(rec["engine"], url="http://127.0.0.1:9/v1")))  # fmt: skip
    line = one_line_error(runner.invoke(app, ["calibrate", str(two), "--out", str(tmp_path / "x")]))
    assert "would be timed here as one file twice (tiny)" in line
    # a served name that is no file here: say what to give
    records = src / "records.jsonl"
    records.write_text(records.read_text().replace('"artifact": "tiny"', '"artifact": "qwen3-0.6b"'))
    line = one_line_error(runner.invoke(app, ["calibrate", str(src), "--out", str(tmp_path / "x")]))
    assert "was measured through a server" in line and "give --artifact FILE" in line
    assert not (tmp_path / "x").exists()
