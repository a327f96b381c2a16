"""Fake device trees for ``EDGETTS_SYSFS_ROOT``, laid out as the kernel documents them.

* :func:`orin_hwmon`: an INA3221 in hwmon (``Documentation/hwmon/ina3221.rst``): per channel
  1..3 a label, a bus voltage ``inN_input`` (mV) and a current ``currN_input`` (mA); shunt
  voltages ``in4..6_input`` (µV) and the summing channel ``in7``/``curr4``, which are not rails.
* :func:`legacy_iio`: the JetPack 4 ``ina3221x`` iio device: ``rail_name_N`` and
  ``in_power{N}_input`` (mW).
* :class:`Waveform`: a writer thread that moves one file along a scripted power waveform
  (atomic replaces, as sysfs reads are), logging what it wrote so a test can integrate it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path


def write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def orin_hwmon(root: Path, rails: dict[str, tuple[int, int]], hwmon: str = "hwmon3") -> Path:
    """An INA3221 with ``rails`` {label: (mV, mA)} on channels 1..3; returns its hwmon folder."""
    d = root / "sys/class/hwmon" / hwmon
    write(d / "name", "ina3221")
    for ch, (label, (mv, ma)) in enumerate(rails.items(), start=1):
        write(d / f"in{ch}_label", label)
        write(d / f"in{ch}_enable", 1)
        write(d / f"in{ch}_input", mv)
        write(d / f"curr{ch}_input", ma)
        write(d / f"in{ch + 3}_input", 5 * ma)  # shunt voltage in µV across a 5 mΩ shunt: not a rail
    total = sum(ma for _, ma in rails.values())
    write(d / "in7_label", "sum of shunt voltages")
    write(d / "in7_input", 5 * total)
    write(d / "curr4_input", total)
    write(root / "sys/class/hwmon/hwmon0/name", "soc_thermal")  # another hwmon device, ignored
    write(root / "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64")
    return d


def legacy_iio(root: Path, rails: dict[str, int]) -> Path:
    """The older iio layout with ``rails`` {name: mW}; returns the iio device folder."""
    d = root / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0"
    for ch, (name, mw) in enumerate(rails.items()):
        write(d / f"rail_name_{ch}", name)
        write(d / f"in_power{ch}_input", mw)
        write(d / f"in_current{ch}_input", mw // 5)  # mA at 5 V: not power, ignored
        write(d / f"in_voltage{ch}_input", 5000)
    write(root / "etc/nv_tegra_release", "# R32 (release), REVISION: 7.1")
    return d


class Waveform:
    """Writes ``to_file(watts)`` into ``path`` every ``period`` s along ``watts(t)`` while running.

    ``log`` holds (time, watts) of every write; :meth:`integral` integrates that piecewise-constant
    signal (what a perfect reader would have seen) between two times.
    """

    def __init__(self, path: Path, watts, to_file, period: float = 0.001):
        self.path, self.watts, self.to_file, self.period = path, watts, to_file, period
        self.log: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            now = time.perf_counter()
            w = self.watts(now - t0)
            write(self.path, self.to_file(w))
            self.log.append((time.perf_counter(), w))  # in the file from here on
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        while not self.log:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def integral(self, t0: float, t1: float) -> float:
        total = 0.0
        for (a, w), (b, _) in zip(self.log, [*self.log[1:], (math.inf, 0.0)]):
            lo, hi = max(a, t0), min(b, t1)
            if hi > lo:
                total += w * (hi - lo)
        return total


def sine(mean: float, amplitude: float, period_s: float):
    return lambda t: mean + amplitude * math.sin(2 * math.pi * t / period_s)
