"""Jetson power rails, NVML sampled power and RAPL wrap-around on fake trees (``EDGETTS_SYSFS_ROOT``).

The energy a meter reports is checked against the integral of what a writer thread put in the
fake files along a scripted waveform, and a whole direct profile on a fake Orin records the
board's input rail.
"""

import json
import sys
import time

import pytest
from conftest import DIRECT
from fake_sysfs import Waveform, legacy_iio, orin_hwmon, sine, write
from test_meters import fake_pynvml
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.profiling.records import RecordLog
from edgetts.telemetry import energy, meters, rails

ORIN = {"VDD_IN": (5000, 2000), "VDD_CPU_GPU_CV": (5000, 700), "VDD_SOC": (5000, 300)}


@pytest.fixture
def root(monkeypatch, tmp_path):
    """An empty device tree as the sysfs root, and no NVML, whatever this machine has."""
    monkeypatch.setenv("EDGETTS_SYSFS_ROOT", str(tmp_path))
    monkeypatch.setattr(energy, "probe_nvml", lambda: energy.Probe("nvml", False, "no NVML here"))
    return tmp_path


def test_hwmon_power_is_voltage_times_current_of_the_input_rail(root):
    orin_hwmon(root, ORIN)
    found = rails.hwmon_rails()
    # Channels 1..3 only: the shunt voltages (in4..6) and the summing channel (in7, curr4) are not rails.
    assert [r.name for r in found] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    total = rails.find_rails()
    assert total.name == "VDD_IN" and total.watts() == pytest.approx(10.0)  # 5,000 mV x 2,000 mA
    p = energy.probe_jetson()
    assert p.available and p.reading is energy.Reading.POWER and "VDD_IN" in p.detail


def test_without_an_input_rail_the_rails_add_up_and_off_channels_are_skipped(root):
    d = orin_hwmon(root, {"VDD_CPU": (5000, 400), "VDD_GPU": (5000, 600), "VDD_DDR": (1100, 1000)})
    write(d / "in3_enable", 0)  # switched off: its reads fail with ENODATA on a device
    total = rails.find_rails()
    assert total.name == "VDD_CPU+VDD_GPU" and total.watts() == pytest.approx(5.0)
    write(d / "curr2_input", "")  # a read that fails skips that sample (None), never adds a zero
    assert total.watts() is None


def test_readings_no_rail_gives_are_not_power(root):
    """A rail near 0 A reads a little below zero (the monitor's offset): no power, not negative power. A
    value no board draws, a value that is not a number, and a named pipe in a captured tree (which would
    block the meter's thread) are failed reads: that sample is skipped."""
    import os

    d = orin_hwmon(root, {"VDD_IN": (5000, 2000)})
    total = rails.find_rails()
    write(d / "curr1_input", -3)
    assert total.watts() == 0.0
    for bad in ("-99999999999999999999999", "1" * 5000, "abc", 10**9):
        write(d / "curr1_input", bad)
        assert total.watts() is None, bad
    (d / "curr1_input").unlink()
    os.mkfifo(d / "curr1_input")
    assert total.watts() is None


def test_legacy_iio_reads_milliwatts_and_does_not_count_the_input_twice(root):
    legacy_iio(root, {"POM_5V_IN": 9800, "POM_5V_GPU": 2100, "POM_5V_CPU": 3300})
    total = rails.find_rails()
    assert total.layout == "iio" and total.name == "POM_5V_IN" and total.watts() == pytest.approx(9.8)
    legacy_iio(root, {"VDD_SYS_GPU": 2100, "VDD_SYS_CPU": 3300})  # no input rail: the sum
    (root / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0/rail_name_2").unlink()
    (root / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0/in_power2_input").unlink()
    assert rails.find_rails().name == "VDD_SYS_GPU+VDD_SYS_CPU"


def test_no_rails_and_unreadable_rails_say_why(root):
    assert not energy.probe_jetson().available
    d = orin_hwmon(root, {"VDD_IN": (5000, 2000)})
    write(d / "in1_input", "")
    p = energy.probe_jetson()
    assert not p.available and "none readable" in p.detail


def _metered(meter, seconds: float):
    with meter.measure() as measured:
        time.sleep(seconds)  # a query: its native decoding runs without the GIL, as this sleep does
    return measured()


@pytest.mark.parametrize("layout", ["hwmon", "iio"])
def test_energy_follows_a_power_waveform_within_two_percent(root, layout):
    if layout == "hwmon":
        d = orin_hwmon(root, {"VDD_IN": (5000, 2000), "VDD_SOC": (5000, 300)})
        path, to_file = d / "curr1_input", lambda w: round(w * 1000 / 5.0)  # mA at 5,000 mV
    else:
        d = legacy_iio(root, {"POM_5V_IN": 10000, "POM_5V_GPU": 2000})
        path, to_file = d / "in_power0_input", lambda w: round(w * 1000)  # mW
    with Waveform(path, sine(10.0, 4.0, 0.25), to_file) as wave:
        meter = meters.QueryMeter()
        m = _metered(meter, 0.6)
    samples = meter.source.samples
    truth = wave.integral(samples[0][0], samples[-1][0])
    assert m.energy_source == "jetson" and m.energy_rail in ("VDD_IN", "POM_5V_IN")
    assert len(samples) >= 30  # 100 Hz over 0.6 s, with room for a busy machine
    assert m.energy_j == pytest.approx(truth, rel=0.02)


def test_mean_power_is_over_the_readings_interval_not_the_query_alone(root, monkeypatch):
    """A short query on a busy machine: the last reading comes a while after the query ended (here
    20 ms, made by a slow memory read); the mean power is still the rail's 10 W, not the joules of
    the longer interval over the query's few milliseconds."""
    legacy_iio(root, {"POM_5V_IN": 10000})
    meter = meters.QueryMeter()
    slow = meters.rss_bytes

    def late():
        time.sleep(0.02)
        return slow()

    with meter.measure() as measured:
        monkeypatch.setattr(meters, "rss_bytes", late)  # only after the query's start
    m = measured()
    assert meter.source.span() >= m.seconds + 0.02  # the last reading came after the late one
    assert m.avg_power_w == pytest.approx(10.0) and m.energy_j == pytest.approx(10.0 * meter.source.span())


def test_nvml_sampled_power_follows_a_waveform(monkeypatch, root):
    wave_w = sine(60.0, 25.0, 0.2)
    t0 = time.perf_counter()
    log = []

    def power_mw(h):
        t = time.perf_counter()
        log.append(t)
        return round(1000 * wave_w(t - t0))

    nv = fake_pynvml(counter_step_mj=None)
    nv.nvmlDeviceGetPowerUsage = power_mw
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(energy, "probe_nvml", energy.PROBES["nvml"])
    meter = meters.QueryMeter()
    m = _metered(meter, 0.5)
    a, b = meter.source.samples[0][0], meter.source.samples[-1][0]
    # The exact integral of the sine between the first and last reading (trapezoids at 100 Hz on a
    # 5 Hz sine are within a fraction of a percent; the 2% leaves room for a late sampler).
    import math

    exact = 60.0 * (b - a) - 25.0 * 0.2 / (2 * math.pi) * (
        math.cos(2 * math.pi * (b - t0) / 0.2) - math.cos(2 * math.pi * (a - t0) / 0.2))  # fmt: skip
    assert m.energy_source == "nvml" and m.energy_rail == "gpu0"
    assert m.energy_j == pytest.approx(exact, rel=0.02)


def rapl_packages(root):
    """Two RAPL packages (with a core sub-domain each) at 9 J of a 10 J counter range; their folder."""
    pkg = root / "sys/class/powercap"
    for i in (0, 1):
        write(pkg / f"intel-rapl:{i}/name", f"package-{i}")
        write(pkg / f"intel-rapl:{i}/max_energy_range_uj", 10_000_000)
        write(pkg / f"intel-rapl:{i}/energy_uj", 9_000_000)
        write(pkg / f"intel-rapl:{i}:0/energy_uj", 5)  # a sub-domain (core): part of its package
    return pkg


def read_by_the_meter(source, package, value, guard_s=30):
    """Wait until the meter's thread has read ``value`` from ``package`` (a hang guard, not a time bound:
    on a busy machine the thread may take a while to run)."""
    t0 = time.monotonic()
    while source.last[package] != value:
        assert time.monotonic() - t0 < guard_s, "the meter's thread never read the counter"
        time.sleep(0.001)


def test_rapl_counters_sum_packages_and_survive_wraps(root):
    pkg = rapl_packages(root)
    meter = meters.QueryMeter(interval=0.002)
    assert isinstance(meter.source, meters._Rapl) and meter.source.rail == "package-0+package-1"
    with meter.measure() as measured:
        # package 0 wraps twice (each caught by a reading in between), package 1 moves 0.5 J
        for value in (9_900_000, 500_000, 9_500_000, 1_000_000):
            write(pkg / "intel-rapl:0/energy_uj", value)
            read_by_the_meter(meter.source, 0, value)
        write(pkg / "intel-rapl:1/energy_uj", 9_500_000)
        read_by_the_meter(meter.source, 1, 9_500_000)
    m = measured()
    # package 0: 0.9 + 0.6 + 9.0 + 1.5 = 12.0 J; package 1: 0.5 J
    assert m.energy_source == "rapl" and m.energy_rail == "package-0+package-1"
    assert m.energy_j == pytest.approx(12.5)
    # the mean power is over the interval the first and last reads bound, which holds the query
    assert meter.source.span() >= m.seconds and m.avg_power_w == pytest.approx(12.5 / meter.source.span())


@pytest.mark.parametrize("layout", ["hwmon", "iio"])
def test_direct_profile_on_a_fake_orin_records_the_input_rail(root, tmp_path, layout):
    if layout == "hwmon":
        orin_hwmon(root, ORIN)
        rail = "VDD_IN"
    else:
        legacy_iio(root, {"POM_5V_IN": 10000, "POM_5V_GPU": 2100, "POM_5V_CPU": 3300})
        rail = "POM_5V_IN"
    out = tmp_path / "profile"
    r = CliRunner().invoke(app, ["profile", "--out", str(out), *DIRECT])
    assert r.exit_code == 0, r.output
    records = list(RecordLog(out / "records.jsonl").load().values())
    assert records and all(rec["energy_source"] == "jetson" and rec["energy_rail"] == rail for rec in records)
    assert all(rec["avg_power_w"] == pytest.approx(10.0, rel=0.05) for rec in records)
    cell = json.loads((out / "summary.json").read_text())["cells"][0]
    assert cell["energy_rail"] == rail and cell["energy_j"] > 0
    if cell["accuracy"] > 0:  # joules per correct answer: all the cell's joules over its correct answers
        assert cell["energy_per_correct_j"] == pytest.approx(cell["energy_j"] / cell["accuracy"])
    point = json.loads((out / "pareto.json").read_text())["frontier"][0]
    assert point["energy_rail"] == rail and "energy_per_correct_j" in point
    device = json.loads((out / "device.json").read_text())
    assert device["jetson"]["release"].startswith("# R3")


def test_a_battery_budget_prices_the_energy_drawn_per_answer(root, three_points, tmp_path):
    """``serve --mean-j``: each answer costs the energy the device drew since the previous one (here a fake
    Orin's input rail at 10 W); above the budget the price on the points' profiled energy rises and cheaper
    points are chosen; a config without energy, or a device without a meter, is refused in one line."""
    from test_faults import _post

    from edgetts.pareto.config import ParetoError
    from edgetts.runtime.http import create_app
    from edgetts.telemetry.meters import MeterUnavailable

    config, _ = three_points
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(config))
    with pytest.raises(ParetoError, match="no energy_j"):
        create_app(str(bare), threads=1, mean_j=0.1)
    priced = tmp_path / "energy.json"
    frontier = [dict(p, energy_j=joules) for p, joules in zip(config["frontier"], (1.0, 2.0, 4.0))]
    priced.write_text(json.dumps({**config, "frontier": frontier}))
    with pytest.raises(MeterUnavailable, match="no energy meter"):  # no rails in the tree yet
        create_app(str(priced), threads=1, mean_j=0.1)
    orin_hwmon(root, ORIN)
    app = create_app(str(priced), threads=1, mean_j=0.001, price=0.01)  # far below what any answer draws
    server = app.state.server
    try:
        chosen, prices = [], []
        for _ in range(12):
            r = _post(app, {"prompt": "Evaluate left to right: 8*4-3", "deadline_ms": 100}, {"Authorization": ""})
            assert r.status_code == 200
            chosen.append(r.json()["edgetts"]["point_id"])
            prices.append(r.json()["edgetts"]["price"])
        assert chosen[0] == "p40" and prices == sorted(prices) and prices[-1] > prices[0]  # rising
        assert chosen[-1] in ("p10", "p20")  # the most accurate point draws too much for the budget
        assert server.budget.drawn > 0 and f"edgetts_price {server.price}" in server.metrics.render()
    finally:
        server.budget.close()
        server.executor.close()


def test_run_holds_a_battery_budget_over_the_questions_on_standard_input(root, three_points, tmp_path):
    """``edgetts run - --mean-j``: the same price as ``serve --mean-j``, over a stream of questions (a fake
    Orin drawing 10 W); a device without a meter is refused in one line."""
    from conftest import one_line_error
    from typer.testing import CliRunner

    from edgetts.cli import app

    config, _ = three_points
    priced = tmp_path / "energy.json"
    frontier = [dict(p, energy_j=joules) for p, joules in zip(config["frontier"], (1.0, 2.0, 4.0))]
    priced.write_text(json.dumps({**config, "frontier": frontier}))
    args = ["run", "--config", str(priced), "--deadline-ms", "100", "--json", "-"]
    q = "Evaluate left to right: 8*4-3\n"
    assert "no energy meter" in one_line_error(CliRunner().invoke(app, [*args, "--mean-j", "1"], input=q))
    orin_hwmon(root, ORIN)
    r = CliRunner().invoke(app, [*args, "--mean-j", "0.001", "--price", "0.01"], input=q * 12)
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in r.stdout.splitlines()]
    prices = [d["point"]["price"] for d in out]
    assert len(out) == 12 and prices == sorted(prices) and prices[-1] > prices[0] == 0.01
    assert out[0]["point"]["id"] == "p40" and out[-1]["point"]["id"] in ("p10", "p20")


def test_the_energy_counter_reads_rapl_and_nvml_counters_at_any_moment(root, monkeypatch):
    """``serve --mean-j`` reads the device's energy between answers: RAPL packages (a wrap caught by a read
    in between) and an NVML energy counter, with no sample list kept however long it runs."""
    from test_meters import fake_pynvml

    pkg = rapl_packages(root)
    counter = meters.EnergyCounter(interval=3600)  # its thread never ticks here: every reading is asked
    try:
        assert counter.joules() == 0.0
        write(pkg / "intel-rapl:0/energy_uj", 9_900_000)
        assert counter.joules() == pytest.approx(0.9)
        write(pkg / "intel-rapl:0/energy_uj", 400_000)  # wrapped at 10 J
        write(pkg / "intel-rapl:1/energy_uj", 9_200_000)
        assert counter.joules() == pytest.approx(0.9 + 0.5 + 0.2)
    finally:
        counter.close()
    monkeypatch.setattr(energy, "probe_nvml", lambda: energy.Probe("nvml", True, "fake", energy.Reading.COUNTER))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter_step_mj=3_000))  # 3 J a reading
    counter = meters.EnergyCounter(interval=3600)
    try:
        assert counter.source.name == "nvml" and counter.joules() == pytest.approx(3.0)
        assert counter.joules() == pytest.approx(6.0)
    finally:
        counter.close()
    orin_hwmon(root, ORIN)  # rails are read before RAPL; sampled power integrates without keeping samples
    monkeypatch.setattr(energy, "probe_nvml", lambda: energy.Probe("nvml", False, "no NVML here"))
    counter = meters.EnergyCounter(interval=3600)
    try:
        first = counter.joules()
        time.sleep(0.01)
        assert counter.source.name == "jetson" and counter.joules() > first and not counter.source.samples
    finally:
        counter.close()
