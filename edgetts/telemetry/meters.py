"""Energy, power and memory of one query, from the best source this machine has.

:class:`QueryMeter` wraps a query; ``measure()`` yields a function that returns the query's
:class:`Measurement` once the block has exited::

    meter = QueryMeter()
    with meter.measure() as measured:
        run_the_query()
    m = measured()  # m.energy_j, m.avg_power_w, m.peak_rss_mb, m.seconds, ...

Sources, first that works wins (probed by :mod:`edgetts.telemetry.energy`, whose
``Probe.reading`` says whether a source is a counter or sampled power):

* ``nvml``: the GPU's total-energy counter (millijoules since driver load, Volta and newer);
  without it, power sampled by a background thread and integrated over time;
* ``jetson``: the board's input rail of the INA3221 monitors (bus voltage x current per
  channel in hwmon, milliwatts in the older iio layout; :mod:`edgetts.telemetry.rails`),
  sampled and integrated;
* ``rapl``: the CPU package counters ``energy_uj`` (microjoules, wrapping at
  ``max_energy_range_uj``), read at every tick so that a wrap is seen.

``Measurement.energy_rail`` names what was read (``VDD_IN``, ``package-0``, ``gpu0``).

When none works the result says ``energy_source: "none"`` and why, never a silent zero.
Each query reports its own peak memory: the kernel's count (``VmHWM``, reset when the query
starts), else the background thread's samples of ``/proc/self/statm``; with NVML the thread
samples the GPU's used memory too.  The thread runs only where something must be sampled (a
power source, NVML, or memory without the kernel's count): beside llama.cpp on every core, a
thread waking 100 times a second slows each query.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from edgetts.telemetry import energy, rails, sysfs
from edgetts.telemetry.device import proc_kb

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start the kernel's count of this process's peak memory (``VmHWM``) afresh; False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak memory since :func:`reset_peak_rss` (``VmHWM``), or None where it is not known."""
    kb = proc_kb("/proc/self/status", "VmHWM")
    return None if kb is None else kb * 1024


@dataclass
class Measurement:
    energy_j: float | None
    avg_power_w: float | None
    energy_source: str
    energy_reason: str | None
    peak_rss_mb: float
    peak_gpu_mb: float | None
    seconds: float
    energy_rail: str | None = None  # what was read: the Jetson rail(s), the RAPL package(s), the GPU


class _Source:
    name = "none"
    rail: str | None = None

    def start(self) -> None: ...
    def sample(self) -> None: ...
    def stop(self) -> float: ...  # joules
    def so_far(self) -> float: ...  # joules since start, without stopping

    def span(self) -> float:
        """Seconds between the readings that bound the joules: the interval their mean power is over."""
        return self.t_stop - self.t_start


class _Rapl(_Source):
    """The package counters (microjoules), summed over packages; read at every tick of the meter's
    thread so that a counter wrapping at ``max_energy_range_uj`` is caught between two readings."""

    name = "rapl"

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.wraps = [sysfs.read_int(os.path.join(os.path.dirname(p), "max_energy_range_uj")) for p in paths]
        names = [sysfs.read_text(os.path.join(os.path.dirname(p), "name")) for p in paths]
        self.rail = "+".join(n or os.path.basename(os.path.dirname(p)) for n, p in zip(names, paths))

    def _read(self) -> list[int | None]:
        return [sysfs.read_int(p) for p in self.paths]

    def start(self) -> None:
        self.last = self._read()
        self.total_uj = 0
        self.t_start = time.perf_counter()

    def sample(self) -> None:
        now = self._read()
        for i, (a, b) in enumerate(zip(self.last, now)):
            if a is None or b is None:
                continue  # a failed read: the next one covers the interval
            d = b - a
            if d < 0 and self.wraps[i]:
                d += self.wraps[i]
            self.total_uj += max(d, 0)
            self.last[i] = b

    def stop(self) -> float:
        self.sample()
        self.t_stop = time.perf_counter()
        return self.total_uj / 1e6

    def so_far(self) -> float:
        return self.total_uj / 1e6


class _Sampled(_Source):
    """Integrates power readings (watts) taken by the meter's thread (trapezoids between samples;
    a reading that failed is skipped); ``keep`` keeps the samples too (a meter running for days
    does not)."""

    def __init__(self, name: str, read_watts, rail: str | None = None):
        self.name, self.read_watts, self.rail = name, read_watts, rail
        self.samples: list[tuple[float, float]] = []
        self.keep, self.total, self.last = True, 0.0, None

    def start(self) -> None:
        self.samples, self.total, self.last, self.first = [], 0.0, None, None
        self.sample()

    def sample(self) -> None:
        w = self.read_watts()
        if w is None:
            return
        t = time.perf_counter()
        if self.last is not None:
            self.total += (t - self.last[0]) * (self.last[1] + w) / 2
        else:
            self.first = t
        self.last = (t, w)
        if self.keep:
            self.samples.append((t, w))

    def stop(self) -> float:
        self.sample()
        return self.total

    def so_far(self) -> float:
        return self.total

    def span(self) -> float:
        # From the first reading that worked to the last: a failed read at either end shortens both.
        return self.last[0] - self.first if self.last is not None else 0.0


class _NvmlCounter(_Source):
    name = "nvml"
    rail = "gpu0"

    def __init__(self, pynvml, handle):
        self.nv, self.h = pynvml, handle

    def start(self) -> None:
        self.e0 = self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h)
        self.t_start = time.perf_counter()

    def stop(self) -> float:
        self.t_stop = time.perf_counter()
        return (self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h) - self.e0) / 1000

    def so_far(self) -> float:
        return self.stop()


def _pick_source() -> tuple[_Source | None, str, object]:
    """(source, reasons for the ones skipped, nvml handle or None)."""
    reasons = []
    nv_handle = None
    p = energy.probe_nvml()
    if p.available:
        import pynvml

        pynvml.nvmlInit()
        nv_handle = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        if p.reading is energy.Reading.COUNTER:
            return _NvmlCounter(*nv_handle), "", nv_handle
        return _Sampled("nvml", lambda: pynvml.nvmlDeviceGetPowerUsage(nv_handle[1]) / 1000, "gpu0"), "", nv_handle
    reasons.append(f"nvml: {p.detail}")
    p = energy.probe_jetson()
    total = rails.find_rails() if p.available else None
    if total is not None:
        return _Sampled("jetson", total.watts, total.name), "", None
    reasons.append(f"jetson: {p.detail}")
    p = energy.probe_rapl()
    if p.available:
        return _Rapl(energy.rapl_domains()), "", None
    reasons.append(f"rapl: {p.detail}")
    return None, "; ".join(reasons), None


class QueryMeter:
    """Measures energy, power and peak memory around each query, sampling every ``interval`` s
    (100 Hz by default: a request of 30 ms still gets a few power readings)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.source, self.reason, self.nvml = _pick_source()

    @property
    def source_name(self) -> str:
        return self.source.name if self.source else "none"

    @contextmanager
    def measure(self):
        box: dict = {}
        stop = threading.Event()
        peak = {"rss": rss_bytes(), "gpu": self._gpu_bytes()}
        # A thread starts only where something must be sampled (power, GPU memory, or memory where the kernel
        # keeps no peak): with llama.cpp's threads on every core, one waking 100 times a second made each
        # query about a tenth slower (measured on 2 cores), which a profile would have recorded as the device's.
        kernel_peak = reset_peak_rss() and peak_rss_bytes() is not None
        sampled = self.source is not None or self.nvml is not None or not kernel_peak

        def loop():
            while not stop.wait(self.interval):
                peak["rss"] = max(peak["rss"], rss_bytes())
                g = self._gpu_bytes()
                if g is not None:
                    peak["gpu"] = max(peak["gpu"] or 0, g)
                if self.source:
                    self.source.sample()

        if self.source:
            self.source.start()
        t0 = time.perf_counter()
        th = threading.Thread(target=loop, daemon=True) if sampled else None
        if th:
            th.start()
        try:
            yield lambda: box["m"]
        finally:
            stop.set()
            if th:
                th.join()
            secs = time.perf_counter() - t0
            peak["rss"] = max(peak["rss"], rss_bytes(), (peak_rss_bytes() or 0) if kernel_peak else 0)
            joules = self.source.stop() if self.source else None
            # Mean power over the interval the joules were read across (its readings bound the query, a
            # little outside it): over the query's own seconds a short query on a busy machine read high.
            span = self.source.span() if self.source else 0.0
            box["m"] = Measurement(
                energy_j=joules,
                avg_power_w=(joules / span) if joules is not None and span > 0 else None,
                energy_source=self.source_name,
                energy_reason=None if self.source else self.reason,
                peak_rss_mb=peak["rss"] / 2**20,
                peak_gpu_mb=peak["gpu"] / 2**20 if peak["gpu"] is not None else None,
                seconds=secs,
                energy_rail=self.source.rail if self.source else None,
            )

    def _gpu_bytes(self) -> int | None:
        if not self.nvml:
            return None
        nv, h = self.nvml
        return nv.nvmlDeviceGetMemoryInfo(h).used


class MeterUnavailable(ValueError):
    """No energy source on this device (the reasons each was skipped)."""


class EnergyCounter:
    """The device's energy since it was started, readable at any moment: the best source
    :class:`QueryMeter` would use, sampled by a thread every ``interval`` s for as long as it runs
    (a server shares it out over the requests it answers).  :class:`MeterUnavailable` where no
    source exists."""

    def __init__(self, interval: float = 0.01):
        self.source, reason, _ = _pick_source()
        if self.source is None:
            raise MeterUnavailable(f"no energy meter on this device ({reason})")
        self.source.keep = False
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.source.start()
        self.thread = threading.Thread(target=self._loop, args=(interval,), name="edgetts-energy", daemon=True)
        self.thread.start()

    def _loop(self, interval: float) -> None:
        while not self.stopped.wait(interval):
            with self.lock:
                self.source.sample()

    def joules(self) -> float:
        """Joules since the counter started, up to now."""
        with self.lock:
            self.source.sample()
            return self.source.so_far()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
