"""Energy sources and the query meter on fake NVML and fake sysfs: each branch, on any machine."""

import itertools
import sys
import threading
import types

import pytest

from edgetts.telemetry import energy, meters
from edgetts.telemetry.energy import Probe, Reading


class NVMLError(Exception):
    pass


def fake_pynvml(counter_step_mj=None, power_mw=50_000):
    """A stand-in for ``pynvml`` with one GPU whose energy counter grows by ``counter_step_mj`` per
    reading; without a step the GPU has no energy counter."""
    readings = itertools.count(1_000, counter_step_mj or 1)

    def total_energy(h):
        if counter_step_mj is None:
            raise NVMLError("Not Supported")
        return next(readings)

    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
        nvmlDeviceGetPowerUsage=lambda h: power_mw,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**20),
    )


@pytest.fixture
def no_sysfs(monkeypatch, tmp_path):
    """No Jetson rails and no RAPL domains, whatever this machine has: an empty sysfs root."""
    monkeypatch.setenv("EDGETTS_SYSFS_ROOT", str(tmp_path))
    return tmp_path


def test_gpu_without_energy_counter_is_metered_by_sampled_power(monkeypatch, no_sysfs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter_step_mj=None, power_mw=50_000))
    p = energy.probe_nvml()
    # The detail mentions the missing "energy counter": the meter must not read it as present.
    assert p.available and p.reading is Reading.POWER and "no energy counter" in p.detail
    meter = meters.QueryMeter(interval=0.001)
    assert isinstance(meter.source, meters._Sampled) and meter.source_name == "nvml"
    with meter.measure() as measured:
        pass
    m = measured()
    samples = meter.source.samples
    assert len(samples) >= 2 and all(w == 50.0 for _, w in samples)
    assert m.energy_j == pytest.approx(50.0 * (samples[-1][0] - samples[0][0]))
    assert m.energy_source == "nvml" and m.energy_reason is None and m.peak_gpu_mb == 3.0


def test_probe_detail_wording_does_not_choose_the_branch(monkeypatch, no_sysfs):
    """Only ``reading`` decides: a power probe whose detail names a counter still samples power, and back."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter_step_mj=3_000))
    monkeypatch.setattr(energy, "probe_nvml", lambda: Probe("nvml", True, "no energy counter", Reading.COUNTER))
    assert isinstance(meters.QueryMeter().source, meters._NvmlCounter)
    monkeypatch.setattr(energy, "probe_nvml", lambda: Probe("nvml", True, "total energy counter", Reading.POWER))
    assert isinstance(meters.QueryMeter().source, meters._Sampled)


def test_gpu_energy_counter_is_read_before_and_after(monkeypatch, no_sysfs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter_step_mj=3_000))
    p = energy.probe_nvml()
    assert p.available and p.reading is Reading.COUNTER and p.to_dict()["reading"] == "counter"
    meter = meters.QueryMeter(interval=0.001)
    with meter.measure() as measured:
        pass
    m = measured()
    assert m.energy_source == "nvml" and m.energy_j == pytest.approx(3.0)  # one step of 3000 mJ
    # the mean power is over the interval the two reads bound, which holds the query
    assert meter.source.span() >= m.seconds and m.avg_power_w == pytest.approx(3.0 / meter.source.span())


def test_rapl_counter_wraps_and_none_says_why(monkeypatch, no_sysfs):
    monkeypatch.setattr(energy, "probe_nvml", lambda: Probe("nvml", False, "NVML found no GPU"))
    meter = meters.QueryMeter()
    assert meter.source is None and meter.source_name == "none"
    with meter.measure() as measured:
        pass
    m = measured()
    assert m.energy_j is None and m.avg_power_w is None and m.energy_source == "none"
    assert "nvml: NVML found no GPU" in m.energy_reason and "rapl: no RAPL domains" in m.energy_reason

    domain = no_sysfs / "sys/class/powercap" / "intel-rapl:0"
    domain.mkdir(parents=True)
    (domain / "max_energy_range_uj").write_text("10000000\n")
    (domain / "energy_uj").write_text("9000000\n")
    p = energy.probe_rapl()
    assert p.available and p.reading is Reading.COUNTER
    meter = meters.QueryMeter()
    with meter.measure() as measured:
        (domain / "energy_uj").write_text("1000000\n")  # the counter wrapped during the query
    m = measured()
    assert m.energy_source == "rapl" and m.energy_j == pytest.approx(2.0)


def test_unavailable_probes_have_no_reading(no_sysfs):
    for probe in (energy.probe_jetson(), energy.probe_rapl()):
        assert not probe.available and probe.reading is None and probe.to_dict()["reading"] is None


def test_peak_memory_is_the_kernels_without_a_sampling_thread(monkeypatch, no_sysfs):
    """With nothing to sample (no power meter, no GPU) a query's peak memory is the kernel's count, reset at
    its start: no thread wakes beside the engine's (which, on every core, slowed each query by a tenth), and
    memory held only in the middle of the query still counts."""
    monkeypatch.setattr(energy, "probe_nvml", lambda: energy.Probe("nvml", False, "no NVML here"))
    meter = meters.QueryMeter()
    assert meter.source is None and meter.nvml is None
    if not (meters.reset_peak_rss() and meters.peak_rss_bytes()):
        pytest.skip("this kernel keeps no resettable peak (VmHWM)")
    before = threading.active_count()
    with meter.measure() as measured:
        during = threading.active_count()
        block = bytearray(64 * 2**20)  # 64 MiB, touched, then freed before the query ends
        block[:: meters.PAGE] = b"x" * len(block[:: meters.PAGE])
        del block
    m = measured()
    assert during == before  # nothing started
    assert m.peak_rss_mb - meters.rss_bytes() / 2**20 > 48  # the freed block counts in the peak
