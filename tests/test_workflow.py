"""The workflow as a new user meets it: progress with phases, options never silently ignored, outputs
where the user expects them."""

import json
import shutil

import pytest
from conftest import SMALL, one_line_error
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.cli_display import PhaseLog

runner = CliRunner()
Q = "Evaluate left to right: 8*4-3"


def test_a_pooled_profile_reports_each_phase_with_the_time_left(tmp_path):
    args = [a for a in SMALL if a != "--quiet"]
    r = runner.invoke(app, ["profile", "--out", str(tmp_path / "p"), *args])  # stderr is no terminal: log lines
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("profile: ")]
    phases = [ln.split()[1] for ln in lines]
    # calibration, then the sweep, then the direct check: none of them a silent stretch
    assert phases.index("calibrating") < phases.index("sweep", 1) < phases.index("validating")
    assert any("s left" in ln for ln in lines if ln.split()[1] == "calibrating")
    assert all("tiny" in ln for ln in lines if ln.split()[1] in ("calibrating", "validating"))


def test_phase_log_counts_each_phase_on_its_own_clock():
    out = []
    log = PhaseLog(out.append)
    for k in range(0, 21):
        log(k, 20, "m", "calibrating")
    for k in range(0, 101):
        log(k, 100, "m s n=1", "sweep")
    cal = [ln for ln in out if " calibrating " in ln]
    sweep = [ln for ln in out if " sweep " in ln]
    assert len(cal) == 21 and len(sweep) == 21  # one line per 5% of each phase
    assert cal[-1].startswith("profile: calibrating 20/20 (100%)") and "left" in sweep[10]


def test_run_refuses_options_it_would_ignore(direct_profile, tmp_path):
    line = one_line_error(runner.invoke(app, ["run", "--strategy", "single", "--n", "4", Q]))
    assert "--strategy single runs one row; --n 4 would be ignored" in line
    assert "needs --config" in one_line_error(runner.invoke(app, ["run", "--energy-j", "2", Q]))
    cfg = tmp_path / "p"
    shutil.copytree(direct_profile, cfg)
    for bad in ("-1", "0", "nan"):
        r = runner.invoke(app, ["run", "--config", str(cfg / "pareto.json"), "--deadline-ms", "1000", "--energy-j",
                                bad, Q])  # fmt: skip
        assert "--energy-j must be a positive number" in one_line_error(r)
    r = runner.invoke(app, ["run", "--config", str(tmp_path / "nope.json"), Q])
    assert "nope.json" in one_line_error(r) and "deadline" not in one_line_error(r)


def test_pareto_writes_beside_the_profile_by_default(direct_profile, tmp_path, monkeypatch):
    d = tmp_path / "p"
    shutil.copytree(direct_profile, d)
    (d / "pareto.json").unlink()
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["pareto", str(d), "--no-plot"])
    assert r.exit_code == 0, r.output
    assert json.loads((d / "pareto.json").read_text())["schema"] == "edgetts.pareto/v1"
    assert not (tmp_path / "configs").exists()  # never into the current folder's configs/


def test_a_plot_of_zero_accuracies_starts_at_zero(direct_profile, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from edgetts.pareto.config import build_config
    from edgetts.pareto.report import plot

    config, candidates = build_config([direct_profile])
    for p in [*candidates, *config["frontier"]]:
        p["accuracy"] = 0.0
    axes = []
    real = plt.subplots

    def keep(*a, **k):
        fig, ax = real(*a, **k)
        axes.append(ax)
        return fig, ax

    plt.subplots = keep
    try:
        plot(config, candidates, tmp_path / "zero.png")
    finally:
        plt.subplots = real
    low, high = axes[0].get_ylim()
    assert low == 0 and high > 0


def test_a_price_on_compute_trades_accuracy_for_time(three_points):
    from edgetts.runtime import Policy

    config, path = three_points
    d = path.parent
    policy = Policy(config)
    assert policy.select(100).point["id"] == "p40"  # no price: the most accurate that fits
    assert policy.select(100, price=0.0) == policy.select(100)
    # accuracy less price x ms: 0.34, 0.48, 0.46 at price 0.006: the middle point
    assert policy.select(100, price=0.006).point["id"] == "p20"
    assert policy.select(100, price=0.002).point["id"] == "p40"  # 0.62 against 0.56: time is cheap
    assert policy.select(100, price=1e3).point["id"] == "p10"  # time dear enough: the fastest that fits
    assert policy.select(15, price=0.002).point["id"] == "p10"  # the deadline still binds first
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="price must be"):
            policy.select(100, price=bad)
    assert "--price weighs" in one_line_error(runner.invoke(app, ["run", "--price", "0.1", Q]))
    assert "--price must be" in one_line_error(runner.invoke(app, ["run", "--config", str(d / "pareto.json"),
                                                                   "--deadline-ms", "1000", "--price", "-1", Q]))
    r = runner.invoke(app, ["run", "--config", str(path), "--deadline-ms", "100", "--price", "1", "--json",
                            Q])  # fmt: skip
    assert r.exit_code == 0 and json.loads(r.stdout)["point"]["id"] == "p10"


def test_run_answers_standard_input_line_by_line_under_a_mean_budget(three_points):
    """``edgetts run -``: one answer per line with the engine kept open; a question that cannot be answered
    is said on its line and the others go on (exit 2 at the end); ``--mean-ms`` far below what any answer
    takes raises the price answer by answer, until cheaper points are chosen."""
    _, path = three_points
    lines = [Q, "", "Evaluate left to right: " + "1+" * 3000 + "1"] + [Q] * 20
    r = runner.invoke(app, ["run", "--config", str(path), "--deadline-ms", "1000", "--mean-ms", "0.001", "--json", "-"],
                      input="\n".join(lines) + "\n")  # fmt: skip
    assert r.exit_code == 2 and "1 question(s) could not be answered (line 3)" in r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    errors, answers = [d for d in out if "error" in d], [d for d in out if "error" not in d]
    assert [d["line"] for d in errors] == [3] and "exceeds the context" in errors[0]["error"]
    assert [d["line"] for d in answers] == [1, *range(4, 24)] and all(d["answer"] for d in answers)
    prices = [d["point"]["price"] for d in answers]
    assert prices[0] == 0 and prices == sorted(prices) and prices[-1] > prices[1] > 0
    assert answers[0]["point"]["id"] == "p40" and answers[-1]["point"]["id"] in ("p10", "p20")
    # Without a budget, the same stream answers every line at the same point, in text.
    r = runner.invoke(app, ["run", "--config", str(path), "--deadline-ms", "1000", "-"], input=f"{Q}\n{Q}\n")
    assert r.exit_code == 0 and r.stdout.count("point 2 p40") == 2 and "line 2:" in r.stdout
    refusals = {
        ("--mean-ms", "10", Q): "holds a mean over many questions",  # one question has no mean
        ("--config", str(path), "--deadline-ms", "100", "--mean-ms", "10", Q): "holds a mean over many questions",
        ("--config", str(path), "--deadline-ms", "100", "--mean-ms", "nan", "-"): "must be a finite number",
        ("--config", str(path), "--deadline-ms", "100", "--mean-ms", "1", "--mean-j", "1", "-"): "give one",
        ("--config", str(path), "--deadline-ms", "100", "--mean-j", "1", "-"): "no energy_j",
        ("--config", str(path), "--deadline-ms", "0.5", "-"): "shorter than the fastest point",
    }

    for args, said in refusals.items():
        assert said in one_line_error(runner.invoke(app, ["run", *args], input=f"{Q}\n")), args


def test_run_says_undecodable_questions_and_stops_quietly_when_the_reader_goes(three_points):
    """A question that is not UTF-8 (bytes a shell passed on, or a line of standard input) is said in one line;
    a reader that stops reading the answers (``| head -1``) ends the stream without a traceback."""
    import subprocess
    import sys

    _, path = three_points
    assert "not valid UTF-8" in one_line_error(runner.invoke(app, ["run", "--config", str(path), "--deadline-ms",
                                                                   "1000", "Evaluate \udcff"]))  # fmt: skip
    args = [sys.executable, "-m", "edgetts", "run", "--config", str(path), "--deadline-ms", "1000", "--json", "-"]
    lines = b"\xff\xfe 1+1\n" + f"{Q}\n".encode() * 1000  # answers beyond what a pipe holds
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(lines)
    proc.stdin.close()
    first = json.loads(proc.stdout.readline())
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1 and "Traceback" not in err
    assert first == {"line": 1, "error": "the question is not valid UTF-8 text"}


def test_run_with_no_question_on_standard_input_says_so(three_points):
    """An empty file, blank lines only, or standard input closed (``<&-``: a traceback) each say so in one
    line and exit 2, rather than print nothing and succeed."""
    import os
    import subprocess
    import sys

    _, path = three_points
    args = ["run", "--config", str(path), "--deadline-ms", "1000", "-"]
    for given in ("", "\n  \n\n"):
        assert "no question on standard input" in one_line_error(runner.invoke(app, args, input=given))
    proc = subprocess.run([sys.executable, "-m", "edgetts", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "no question on standard input" in proc.stderr
    closed = subprocess.run([sys.executable, "-m", "edgetts", *args], capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.close(0))  # fmt: skip
    assert closed.returncode == 2 and "standard input is closed" in closed.stderr and "Traceback" not in closed.stderr


def test_a_mean_budget_is_held_by_the_price():
    from edgetts.runtime.pricing import MeanBudget

    points = [(10.0, 0.40), (20.0, 0.60), (40.0, 0.70)]  # (ms, accuracy)

    def run(budget, requests=600):
        ctl, costs = MeanBudget(budget), []
        for _ in range(requests):
            ms, _ = max(points, key=lambda p: (p[1] - ctl.price * p[0], -p[0]))
            costs.append(ms)
            ctl.observe(ms)
        return sum(costs[200:]) / len(costs[200:]), ctl

    achieved, ctl = run(25.0)  # between the points: the price mixes 20 and 40 ms (or 10 and 40) to hold it
    assert abs(achieved - 25.0) / 25.0 < 0.15 and ctl.price > 0
    achieved, ctl = run(100.0)  # a budget above the dearest point: no price, the most accurate point
    assert achieved == 40.0 and ctl.price == 0.0
    achieved, _ = run(5.0)  # below the cheapest: the cheapest, as close as it gets
    assert achieved == 10.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="mean budget"):
            MeanBudget(bad)


def test_a_budget_nothing_meets_leaves_a_price_that_comes_back():
    """Hours under a budget below the cheapest point (a too-tight --mean-ms, a slow device) must not wind the
    price up past where choices change: it reached infinity after about 1,500 requests, which the policy
    refuses, and would never have come down once the device was fast again."""
    from edgetts.pareto.config import SCHEMA
    from edgetts.runtime import Policy
    from edgetts.runtime.pricing import MeanSpend

    front = [{"id": f"p{i}", "latency_ms": ms, "accuracy": acc, "model": "m", "artifact": "m.gguf",
              "engine": "llama.cpp", "strategy": "majority", "n": 1, "budget": 8, "latency_quantiles_ms": {},
              "accuracy_ci95": [0, 1]}
             for i, (ms, acc) in enumerate([(10.0, 0.40), (20.0, 0.60), (40.0, 0.70)])]  # fmt: skip
    policy = Policy({"schema": SCHEMA, "device": {}, "task": {"dataset": "x"},
                     "objective": {"latency_quantile": "p95"}, "frontier": front})  # fmt: skip
    spend = MeanSpend(front, 8.0)
    for _ in range(5000):  # the device runs everything 3x slower than profiled: even the cheapest misses 8 ms
        spend.observe(3 * policy.select(1e9, price=spend.price).point["latency_ms"])
    assert 0 < spend.price < 1.0
    chosen = []
    for _ in range(300):  # fast again: 0.4x the profile, the budget sits between the points
        chosen.append(policy.select(1e9, price=spend.price).point["latency_ms"])
        spend.observe(0.4 * chosen[-1])
    assert sum(0.4 * ms for ms in chosen[-100:]) / 100 == pytest.approx(8.0, rel=0.15) and chosen[-1] > 10
