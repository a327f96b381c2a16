"""Which energy sources this machine offers, and why the missing ones are missing.

Three sources are known, each probed without side effects:

* ``nvml``: NVIDIA's management library (``nvidia-ml-py``): total energy counter since
  driver load on Volta and newer, else instantaneous power;
* ``jetson``: the INA3221 power monitors of Jetson boards (hwmon or the older iio layout,
  :mod:`edgetts.telemetry.rails`);
* ``rapl``: Intel/AMD RAPL package energy counters in ``/sys/class/powercap``.

Sysfs paths are read under ``EDGETTS_SYSFS_ROOT`` (:mod:`edgetts.telemetry.sysfs`).

A probe returns a :class:`Probe` saying whether the source works, how a working one is read
(:class:`Reading`: a cumulative energy counter read before and after, or instantaneous power
sampled and integrated) and, either way, a one-line detail for people (the device found, or
the reason it is unusable).  Code decides on ``available`` and ``reading``, never on the
detail's wording.  The profiler reads the first working source; when none works it records
``energy_source: "none"`` with the reasons, never a silent zero.
"""

from __future__ import annotations

import contextlib
import glob
import os
from dataclasses import asdict, dataclass
from enum import Enum

from edgetts.telemetry import rails, sysfs

POWERCAP = "/sys/class/powercap"


class Reading(str, Enum):
    """How a working source yields energy."""

    COUNTER = "counter"  # cumulative energy: read at start and end, take the difference
    POWER = "power"  # instantaneous watts: sample during the query and integrate


@dataclass(frozen=True)
class Probe:
    name: str
    available: bool
    detail: str
    reading: Reading | None = None  # set exactly when ``available``

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reading"] = self.reading.value if self.reading else None
        return d


def probe_nvml() -> Probe:
    try:
        import pynvml
    except ImportError:
        return Probe("nvml", False, "nvidia-ml-py is not installed (pip install 'edgetts[nvml]')")
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError subclasses vary by driver version
        return Probe("nvml", False, f"NVML did not initialise: {e}")
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return Probe("nvml", False, "NVML found no GPU")
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            how, reading = "total energy counter", Reading.COUNTER
        except Exception:  # no energy counter before Volta: fall back to power
            pynvml.nvmlDeviceGetPowerUsage(h)
            how, reading = "sampled power (no energy counter on this GPU)", Reading.POWER
        return Probe("nvml", True, f"{count} GPU(s), {name}: {how}", reading)
    except Exception as e:
        return Probe("nvml", False, f"NVML query failed: {e}")
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def probe_jetson() -> Probe:
    found = rails.all_rails()
    if not found:
        return Probe("jetson", False, f"no INA3221 power monitor under {sysfs.root()} (not a Jetson)")
    total = rails.find_rails()
    if total is None:
        return Probe("jetson", False, f"{len(found)} INA3221 rails found but none readable (run as root?)")
    return Probe("jetson", True, f"INA3221 ({total.layout}) rail {total.name} of {len(found)}", Reading.POWER)


def rapl_domains() -> list[str]:
    """``energy_uj`` of every package domain (``intel-rapl:N``; their sub-domains are parts of them)."""
    found = glob.glob(os.path.join(sysfs.path(POWERCAP), "intel-rapl:*", "energy_uj"))
    return sorted(f for f in found if os.path.basename(os.path.dirname(f)).count(":") == 1)


def probe_rapl() -> Probe:
    domains = rapl_domains()
    if not domains:
        return Probe("rapl", False, f"no RAPL domains under {sysfs.path(POWERCAP)} (virtual machine or unsupported "
                     "CPU)")  # fmt: skip
    if all(sysfs.read_int(d) is not None for d in domains):
        return Probe("rapl", True, f"{len(domains)} RAPL package domain(s), first {domains[0]}", Reading.COUNTER)
    return Probe("rapl", False, f"{len(domains)} RAPL domain(s) found but energy_uj is not readable (needs root)")


PROBES = {"nvml": probe_nvml, "jetson": probe_jetson, "rapl": probe_rapl}


def probe_all() -> list[Probe]:
    return [p() for p in PROBES.values()]
