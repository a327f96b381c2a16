"""Pareto configs, the selection policy with recalibration, pictures, the C header and run --config."""

import itertools
import json
import random
import shutil
import subprocess
import time

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.export.c_header import export_c
from edgetts.models import BUILTIN
from edgetts.pareto.config import SCHEMA, ParetoError, build_config, load_config, write_config
from edgetts.profiling.config import SweepConfig
from edgetts.profiling.runner import run_profile
from edgetts.runtime import Policy

runner = CliRunner()


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """Two model variants (the built-in name and its GGUF path) profiled on a small grid."""
    base = tmp_path_factory.mktemp("profiles")
    out = []
    for name, model in (("a", "tiny"), ("b", str(BUILTIN["tiny"]))):
        cfg = SweepConfig(models=[model], limit=15, strategies=["single", "majority", "esc"], budgets=[16, 48, 96],
                          n=[4, 8], warmup=1)  # fmt: skip
        run_profile(cfg, base / name)
        out.append(base / name)
    return out


def test_frontier_merges_variants_and_is_a_frontier(profiles, tmp_path):
    config, cands = build_config(profiles)
    assert config["schema"] == SCHEMA and config["objective"]["latency_quantile"] == "p95"
    front = config["frontier"]
    assert len(cands) == 2 * 15 and len(front) >= 2
    lat = [p["latency_ms"] for p in front]
    acc = [p["accuracy"] for p in front]
    assert lat == sorted(lat) and all(a < b for a, b in itertools.pairwise(acc))
    for c in cands:  # no candidate beats a frontier point on both axes
        assert not any(c["latency_ms"] < p["latency_ms"] and c["accuracy"] > p["accuracy"] for p in front)
    assert {p["model"] for p in cands} == {"tiny", str(BUILTIN["tiny"])}
    assert len({p["id"] for p in front}) == len(front)
    path = write_config(config, tmp_path / "cfg.json")
    assert load_config(path) == json.loads(json.dumps(config))  # paths stored relative, resolved on loading
    assert not list(tmp_path.glob(".*.tmp"))
    assert all(p["engine"] == "llama.cpp" and "url" not in p for p in front)


def test_artifact_paths_travel_with_the_config(profiles, tmp_path):
    import shutil

    config, _ = build_config(profiles)
    home = tmp_path / "bundle"
    (home / "models").mkdir(parents=True)
    shutil.copy(BUILTIN["tiny"], home / "models" / "tiny-f16.gguf")
    for p in config["frontier"]:
        if p["artifact"] != "tiny":
            p["artifact"] = str(home / "models" / "tiny-f16.gguf")
    write_config(config, home / "cfg.json")
    stored = json.loads((home / "cfg.json").read_text())["frontier"]
    assert {p["artifact"] for p in stored} <= {"tiny", "models/tiny-f16.gguf"}
    moved = shutil.move(home, tmp_path / "elsewhere")
    loaded = load_config(f"{moved}/cfg.json")["frontier"]
    assert {p["artifact"] for p in loaded} <= {"tiny", str(tmp_path / "elsewhere" / "models" / "tiny-f16.gguf")}
    out = runner.invoke(app, ["run", "--config", f"{moved}/cfg.json", "--deadline-ms", "100000", "--json",
                              "Evaluate left to right: 12+7*3"])  # fmt: skip
    assert out.exit_code == 0, out.output


def test_strict_constraints_and_quantile(profiles, tmp_path):
    loose, _ = build_config(profiles)
    strict, _ = build_config(profiles, strict=True)
    assert all(not p["dominated_within_ci"] for p in strict["frontier"])
    assert len(strict["frontier"]) <= len(loose["frontier"])
    floor, _ = build_config(profiles, constraints={"accuracy": {"min": 0.5}})
    assert all(p["accuracy"] >= 0.5 for p in floor["frontier"])
    p50, _ = build_config(profiles, quantile="p50")
    assert all(p["latency_ms"] == p["latency_quantiles_ms"]["p50"] for p in p50["frontier"])
    with pytest.raises(ParetoError, match="unknown metric"):
        build_config(profiles, constraints={"speed": {"max": 1}})
    with pytest.raises(ParetoError, match="no measured point"):
        build_config(profiles, constraints={"accuracy": {"min": 1.5}})
    for bad in (float("nan"), True, "5"):  # a NaN bound compared false with every point and held none back
        with pytest.raises(ParetoError, match="bounds must be numbers"):
            build_config(profiles, constraints={"memory_mb": {"max": bad}})
    with pytest.raises(ParetoError, match="is given twice"):  # its cells would count twice
        build_config([*profiles, f"{profiles[0]}/"])
    # Energy is set in copies of the profiles, so both cases hold whatever source this machine has.
    unmeasured = _with_energy(profiles, tmp_path / "none", lambda i: None)
    with pytest.raises(ParetoError, match=r"energy_j: no profiled point measured it \(energy source: none\)"):
        build_config(unmeasured, constraints={"energy_j": {"max": 1.0}})
    measured = _with_energy(profiles, tmp_path / "joules", lambda i: 0.1 * i)
    capped, cands = build_config(measured, constraints={"energy_j": {"max": 1.0}})
    assert capped["frontier"] and all(p["energy_j"] <= 1.0 for p in capped["frontier"])
    assert any(c["energy_j"] > 1.0 for c in cands)  # the cap had points to exclude


def _with_energy(profiles, dest, joules):
    """Copies of ``profiles`` whose i-th cell reports ``joules(i)`` (None: no energy source)."""
    out = []
    for k, src in enumerate(profiles):
        d = shutil.copytree(src, dest / str(k))
        summary = json.loads((d / "summary.json").read_text())
        for i, cell in enumerate(summary["cells"]):
            j = joules(i)
            cell.update(energy_j=j, energy_source="none" if j is None else "rapl")
        (d / "summary.json").write_text(json.dumps(summary))
        out.append(d)
    return out


def _config(points):
    return {"schema": SCHEMA, "device": {}, "task": {"dataset": "x"}, "objective": {"latency_quantile": "p95"},
            "frontier": [dict({"model": "m", "artifact": "m.gguf", "engine": "llama.cpp", "strategy": "majority",
                               "n": 1, "budget": 8, "latency_quantiles_ms": {}, "accuracy_ci95": [0, 1]}, **p)
                         for p in points]}  # fmt: skip


POINTS = [
    {"id": "fast", "latency_ms": 10.0, "accuracy": 0.4, "energy_j": 0.5, "memory_mb": 100},
    {"id": "mid", "latency_ms": 20.0, "accuracy": 0.6, "energy_j": 2.0, "memory_mb": 200},
    {"id": "slow", "latency_ms": 40.0, "accuracy": 0.8, "energy_j": 1.0, "memory_mb": 900},
]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(schema="edgetts.pareto/v0"), "schema"),
        (lambda c: c.pop("task"), "missing field 'task'"),
        (lambda c: c.update(frontier=[]), "frontier is empty"),
        (lambda c: c["frontier"].reverse(), "not sorted"),
        (lambda c: c["frontier"][1].pop("accuracy"), "frontier[1].accuracy"),
        (lambda c: c["frontier"][0].update(n="8"), "frontier[0].n"),
        (lambda c: c["frontier"][0].update(n=10**12), "frontier[0].n is 1000000000000; it must be from 1"),
    ],
)
def test_loading_validates_with_one_line_errors(tmp_path, mutate, message):
    cfg = _config(POINTS)
    mutate(cfg)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ParetoError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_policy_selects_and_falls_back():
    pol = Policy(_config(POINTS))
    assert pol.select(25).point["id"] == "mid"
    assert pol.select(1000).point["id"] == "slow"
    assert pol.select(1000, energy_j=1.5).point["id"] == "slow"  # mid uses too much energy
    assert pol.select(30, energy_j=1.5).point["id"] == "fast"
    assert pol.select(1000, memory_mb=500).point["id"] == "mid"
    miss = pol.select(5)
    assert miss.miss and miss.point["id"] == "fast"
    assert pol.select(1000, energy_j=0).point["id"] == "slow"  # <= 0: no energy limit


def test_recalibration_is_the_median_of_runs_against_each_points_median():
    # a point whose typical run is a quarter of its p95 (Early-Stopping Consistency is like that)
    skewed = [*POINTS[:2], dict(POINTS[2], latency_quantiles_ms={"p50": 10.0, "p95": 40.0})]
    pol = Policy(_config(skewed))
    for ms in [9, 11, 10, 38, 10, 12, 9]:  # ordinary runs, one long: the device is as profiled
        pol.observe("slow", ms)
    assert pol.slowdown == 1.0  # an average against the p95 would have fallen to about 0.4
    assert pol.select(30).point["id"] == "mid"  # so slow's 40 ms p95 still does not fit 30 ms
    for _ in range(10):  # now everything takes twice as long
        pol.observe("slow", 20.0)
        pol.observe("fast", 20.0)  # no p50 in the config: its latency_ms stands in
    assert pol.slowdown == pytest.approx(2.0)
    assert pol.select(60).point["id"] == "mid"  # slow's 40 ms p95 now predicts 80 ms
    for _ in range(8):  # it recovers: half of the kept runs are back to the profile
        pol.observe("mid", 20.0)
    assert pol.slowdown == 1.0 and pol.select(60).point["id"] == "slow"
    for _ in range(15):
        pol.observe("slow", 30.0)
    for _ in range(8):  # refusals right after runs measured the device measure nothing: the factor stands
        pol.relax()
    assert pol.slowdown == pytest.approx(3.0)
    clock = [time.perf_counter()]
    pol.clock = lambda: clock[0]
    for _ in range(8):  # with nothing measured for a while, refusals pull it back: it must not refuse for ever
        clock[0] += pol.RELAX_S
        pol.relax()
    assert pol.slowdown == 1.0
    pol.observe("unknown", 1e6)  # not a point of the config: ignored
    for bad in (-1.0, 0.0, float("nan"), float("inf")):  # not latencies: ignored
        pol.observe("slow", bad)
    assert pol.slowdown == 1.0 and len(pol.runs) == 15


def test_pictures_have_content(profiles, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from edgetts.pareto.report import plot, report

    config, cands = build_config(profiles)
    png = plot(config, cands, tmp_path / "pareto.png")
    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.05  # not blank
    html = report(config, png, tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and html.count("<tr>") == len(config["frontier"]) + 1
    assert config["frontier"][0]["id"] in html


C_MAIN = r"""
#include <stdio.h>
#include "edgetts_policy.h"
int main(void) {
    double d, e;
    const char *votes[] = {"7", NULL, "8", "8", "7", NULL};
    const char *none[] = {NULL, NULL};
    while (scanf("%lf %lf", &d, &e) == 2) printf("%d\n", edgetts_select(d, e));
    printf("%s %s\n", edgetts_majority(votes, 6), edgetts_majority(none, 2) == NULL ? "null" : "bad");
    printf("%s\n", edgetts_ids[0]);
    return 0;
}
"""


def test_c_header_matches_the_python_policy(profiles, tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no C compiler")
    config, _ = build_config(profiles)
    for p, e in zip(config["frontier"], (0.9, 0.3, None, 0.05, 0.6, 0.2, 0.4)):
        p["energy_j"] = e  # varied energies (and one unmeasured) so the energy limit matters
    export_c(config, tmp_path / "edgetts_policy.h")
    (tmp_path / "main.c").write_text(C_MAIN)
    exe = tmp_path / "policy"
    subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(exe), "main.c"],
                   cwd=tmp_path, check=True)  # fmt: skip
    rng = random.Random(0)
    top = config["frontier"][-1]["latency_ms"]
    queries = [(rng.uniform(0, 1.5 * top), rng.choice([0.0, -1.0, rng.uniform(0, 1.0)])) for _ in range(1000)]
    out = subprocess.run([str(exe)], input="".join(f"{d!r} {e!r}\n" for d, e in queries), capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    pol = Policy(config)
    expected = [pol.select(d, energy_j=e).index for d, e in queries]
    assert [int(x) for x in out[:1000]] == expected
    assert out[1000] == "7 null"  # a 2-2 tie goes to the answer seen first
    assert out[1001] == config["frontier"][0]["id"]


def test_cli_pareto_export_and_run_with_config(profiles, tmp_path):
    out = tmp_path / "tiny.json"
    # This test is about export and run; a busy machine may fail the profile's latency check.
    r = runner.invoke(app, ["pareto", *map(str, profiles), "--out", str(out), "--no-plot", "--accept-unvalidated"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["export-c", str(out), "--out", str(tmp_path / "p.h")]).exit_code == 0
    r = runner.invoke(
        app, ["run", "--config", str(out), "--deadline-ms", "1000", "--json", "Evaluate left to right: 8*4-3"]
    )
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)
    best = max(load_config(out)["frontier"], key=lambda p: p["accuracy"])
    assert t["point"]["id"] == best["id"] and not t["point"]["miss"]
    # A real answer, or (a machine too busy for the deadline) an honest "no answer" saying why.
    assert t["answer"] == "29" or (t["answer"] is None and t["early_stop"] == "deadline"), t
    # A deadline no point meets even on an idle device is the caller's error, naming the fastest point.
    fastest = load_config(out)["frontier"][0]
    r = runner.invoke(app, ["run", "--config", str(out), "--deadline-ms", "0.01", "8*4"])
    line = one_line_error(r)
    assert "deadline_ms=0.01 is shorter than the fastest point needs" in line and fastest["id"] in line
    r = runner.invoke(app, ["run", "--config", str(tmp_path / "nope.json"), "8*4"])  # the file is named first
    assert "nope.json" in one_line_error(r)
    assert runner.invoke(app, ["run", "--config", str(out), "q"]).exit_code == 2
    r = runner.invoke(app, ["run", "--config", str(out), "--engine-option", "threads=1", "8*4"])
    assert r.exit_code == 2 and "--engine-option" in r.output  # the config's points name their own options
    assert runner.invoke(app, ["pareto", str(tmp_path), "--out", str(out)]).exit_code == 2
    assert runner.invoke(app, ["pareto", *map(str, profiles), "--constraints", "{oops"]).exit_code == 2
    assert runner.invoke(app, ["export-c", str(tmp_path / "missing.json")]).exit_code == 2
