"""A mean budget in the C runtime (``edgetts_set_mean_budget``, ``edgetts_spent``, ``edgetts-answer
--mean-ms``) against :mod:`edgetts.runtime.pricing`: the same price after every answer's cost, in
milliseconds and in joules, and the same point chosen under it; and the real engine's answers
counted by the runtime itself.  The configs are the shipped one (no energy figures) and a copy
whose points carry energies, each built with ``edgetts build-c``.
"""

import json
import math
import random
import subprocess
from pathlib import Path

import pytest
from c_policy import CC, build_driver, drive
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.pareto.config import write_config
from edgetts.runtime import Policy
from edgetts.runtime.pricing import CEILING, MeanBudget, cheapest_price

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")
runner = CliRunner()
SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "tiny-epyc-2core.json"
E_ARGUMENT = 1  # edgetts_status


def build(config, out):
    res = runner.invoke(app, ["build-c", str(config), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return build_driver(out, out / "driver")


@pytest.fixture(scope="module", params=["ms", "joules"])
def case(request, tmp_path_factory):
    """(driver, config, joules): the shipped config for a budget in ms, a copy with energies for joules."""
    base = tmp_path_factory.mktemp(f"c-pricing-{request.param}")
    config = SHIPPED
    if request.param == "joules":
        cfg = json.loads(SHIPPED.read_text())
        for i, p in enumerate(cfg["frontier"]):  # not in latency order: the price must weigh energy, not time
            p["energy_j"] = round(0.02 * p["latency_ms"] * (1.5 if i % 2 else 0.8), 4)
        config = write_config(cfg, base / "energy.json")
    return build(config, base), config, request.param == "joules"


def test_the_mean_budget_moves_the_price_as_python_does(case):
    exe, config, joules = case
    policy = Policy.load(config)
    front = policy.frontier
    key = "energy_j" if joules else "latency_ms"
    ceiling = CEILING * cheapest_price(front, key)
    charge = (lambda p: p["energy_j"]) if joules else None
    costs = [p[key] for p in front]
    rng = random.Random(1)
    lines, expected = [], []
    target, price, moved = None, 0.0, set()
    for k in range(1500):
        if k % 300 == 0:  # a new budget (the price kept, the mean started again), from a start price
            if k == 600:
                price = rng.uniform(0, 0.01)
                lines.append(f"p {price!r} 0")
                expected.append(repr(price))
            budget = rng.uniform(min(costs), max(costs))
            target = MeanBudget(budget, ceiling=ceiling)
            target.price = price
            lines.append(f"b {budget!r} {int(joules)}")
            expected.append("0")
        phase = k % 300  # spells above the budget (to the ceiling), below it (to 0), and around it
        if phase < 80:
            cost = rng.uniform(1.5, 4) * target.budget
        elif phase < 160:
            cost = rng.uniform(0, 0.5) * target.budget
        else:
            cost = rng.uniform(0.5, 1.6) * target.budget
        if rng.random() < 0.03:  # costs that were not measured move nothing, on either side
            cost = rng.choice([math.nan, -1.0, math.inf, -math.inf])
        price = target.observe(cost)
        moved.add(price)
        lines.append(f"c {cost!r} 0")
        expected.append(repr(price))
        if k % 7 == 3:
            deadline = rng.uniform(front[0]["latency_ms"], 2 * front[-1]["latency_ms"])
            sel = policy.select(deadline, price=price, charge=charge)
            lines.append(f"s {deadline!r} 0")
            expected.append(f"{sel.index} {int(sel.miss)}")
    for e, g in zip(expected, drive(exe, lines), strict=True):
        assert (float(e) == float(g)) if " " not in e else e == g
    assert 0.0 in moved and ceiling in moved and len(moved) > 500  # off, at the ceiling, and every way between


def test_budgets_the_runtime_cannot_hold_are_refused(case):
    exe, _, joules = case
    lines = ["b -1 0", "b nan 0", "b inf 0", "b 5 7", "b 5 -1", "p 0.002 0", "b 5 1", "c 1000 0", "b 0 0",
             "c 1000 0"]  # fmt: skip
    got = drive(exe, lines)
    assert got[:5] == [str(E_ARGUMENT)] * 5
    if joules:  # every point has its energy: a budget in joules holds; over it, the price rises from its start
        assert got[6] == "0" and float(got[7]) > 0.002
    else:  # no point has an energy figure: nothing to price in joules, and the price stays as it was
        assert got[6] == str(E_ARGUMENT) and float(got[7]) == 0.002
    assert got[8] == "0" and got[9] == got[7]  # budget 0: none held, the price stays


def test_edgetts_answer_counts_each_answer_against_the_mean(case, tmp_path):
    exe, config, joules = case
    if joules:
        pytest.skip("edgetts-answer holds a budget in ms; one in joules takes the caller's meter (edgetts_spent)")
    front = Policy.load(config).frontier
    binary = exe.parent / "bin" / "edgetts-answer"
    questions = [f"What is {i} + {i + 3}?" for i in range(30)]
    # A budget no point meets: each answer is over it, so the price rises by the same step each time.
    proc = subprocess.run([str(binary), "--mean-ms", "0.001", "--threads", "1"], input="\n".join(questions) + "\n",
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    chosen = [o["point_id"] for o in out]
    assert len(chosen) == 30
    # the price each point was chosen under: 0 first, then the floor, then up by e^0.5 an answer
    prices = [o["price"] for o in out]
    assert prices[:2] == [0.0, MeanBudget.FLOOR] and prices[2] == pytest.approx(MeanBudget.FLOOR * math.exp(0.5))
    best = max(front, key=lambda p: p["accuracy"])["id"]
    cheapest = min(front, key=lambda p: p["latency_ms"])["id"]
    assert chosen[0] == best and chosen[-1] == cheapest
    one = subprocess.run([str(binary), "--point", "0", "--threads", "1"], input="What is 1 + 1?\n",
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0 and "price" not in json.loads(one.stdout)  # no policy chose it: no price
    bad = subprocess.run([str(binary), "--mean-ms", "5", "--point", "0"], input="x\n", capture_output=True, text=True)
    assert bad.returncode == 2 and "--mean-ms holds a budget" in bad.stderr
