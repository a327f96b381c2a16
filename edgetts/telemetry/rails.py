"""Jetson power rails: the INA3221 monitors in sysfs, read as the kernel documents them.

Two layouts exist, and both are read under :func:`edgetts.telemetry.sysfs.root`:

* hwmon (JetPack 5 and later, mainline ``drivers/hwmon/ina3221.c``): a folder
  ``/sys/class/hwmon/hwmon*`` whose ``name`` is ``ina3221`` has, per channel N in 1..3,
  ``inN_label`` (the rail, such as ``VDD_IN``), ``inN_input`` (bus voltage, mV) and
  ``currN_input`` (current, mA); power is their product.  ``in4..6_input`` are shunt voltages
  (µV) and ``in7``/``curr4`` the summing channel: neither is a rail, so only channels 1..3 with a
  label count, and a channel switched off (``inN_enable`` 0, or reads failing) is skipped.
* iio (JetPack 4, the ``ina3221x`` driver): ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/``
  holds ``rail_name_N`` and ``in_power{N}_input`` in mW per rail.

The board's input rail (``VDD_IN`` on Orin and Xavier, ``POM_5V_IN`` on Nano and TX2) already
carries every other rail, so where it exists it alone is the total; adding the sub-rails to it
would count them twice.  Without it, the total is the sum of the rails found.
:func:`find_rails` returns a :class:`RailSet` whose ``watts()`` reads the total now and whose
``name`` is what records store as ``energy_rail``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from edgetts.telemetry import sysfs

HWMON = "/sys/class/hwmon"
IIO = "/sys/bus/i2c/drivers/ina3221x"
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # the board's input: the total of everything else
MAX_MW = 1e7  # 10 kW: far above any board a rail monitor sits on


@dataclass(frozen=True)
class Rail:
    name: str
    files: tuple[str, ...]  # (voltage mV, current mA) in hwmon, (power mW,) in iio
    layout: str  # "hwmon" or "iio"

    def milliwatts(self) -> float | None:
        """The rail's power now, or None when a read failed or gave what no rail draws: below zero counts
        as 0 (an INA3221 near 0 A reads a few mA below, its offset); beyond ``MAX_MW`` (10 kW), either
        sign, is a damaged reading, not power."""
        values = [sysfs.read_int(f) for f in self.files]
        if any(v is None for v in values):
            return None
        mw = values[0] * values[1] / 1000 if len(values) == 2 else float(values[0])
        return None if abs(mw) > MAX_MW else max(mw, 0.0)


@dataclass(frozen=True)
class RailSet:
    rails: tuple[Rail, ...]

    @property
    def name(self) -> str:
        return "+".join(r.name for r in self.rails)

    @property
    def layout(self) -> str:
        return self.rails[0].layout

    def watts(self) -> float | None:
        """The total power now, or None when a rail could not be read (that sample is skipped)."""
        total = 0.0
        for r in self.rails:
            mw = r.milliwatts()
            if mw is None:
                return None
            total += mw
        return total / 1000


def hwmon_rails() -> list[Rail]:
    rails = []
    for d in sorted(glob.glob(os.path.join(sysfs.path(HWMON), "hwmon*"))):
        if sysfs.read_text(os.path.join(d, "name")) != "ina3221":
            continue
        for ch in (1, 2, 3):
            label = sysfs.read_text(os.path.join(d, f"in{ch}_label"))
            if not label or "sum" in label.lower() or sysfs.read_text(os.path.join(d, f"in{ch}_enable")) == "0":
                continue
            files = (os.path.join(d, f"in{ch}_input"), os.path.join(d, f"curr{ch}_input"))
            if all(os.path.exists(f) for f in files):
                rails.append(Rail(label, files, "hwmon"))
    return rails


def iio_rails() -> list[Rail]:
    rails = []
    for d in sorted(glob.glob(os.path.join(sysfs.path(IIO), "*", "iio:device*"))):
        for f in sorted(glob.glob(os.path.join(d, "in_power*_input"))):
            ch = os.path.basename(f)[len("in_power") : -len("_input")]
            label = sysfs.read_text(os.path.join(d, f"rail_name_{ch}")) or f"{os.path.basename(d)}:power{ch}"
            rails.append(Rail(label, (f,), "iio"))
    return rails


def all_rails() -> list[Rail]:
    return hwmon_rails() or iio_rails()


def find_rails() -> RailSet | None:
    """The rails whose sum is the board's power: its input rail where it has one, else every rail
    that reads; None when there are no readable INA3221 rails."""
    readable = [r for r in all_rails() if r.milliwatts() is not None]
    if not readable:
        return None
    for name in INPUT_RAILS:
        for r in readable:
            if r.name.upper() == name:
                return RailSet((r,))
    return RailSet(tuple(readable))
