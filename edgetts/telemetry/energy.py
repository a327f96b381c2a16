"""Which energy sources this machine offers, and why the missing ones are missing.

Three sources are known, each probed without side effects:

* ``nvml``: NVIDIA's management library (``nvidia-ml-py``): total energy counter since
  driver load on Volta and newer, else instantaneous power;
* ``jetson``: the INA3221 power monitors of Jetson boards, exposed by hwmon in sysfs;
* ``rapl``: Intel/AMD RAPL package energy counters in ``/sys/class/powercap``.

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

POWERCAP = "/sys/class/powercap"
HWMON = "/sys/class/hwmon"


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


def jetson_rails() -> list[str]:
    """sysfs files of INA3221 power readings (in mW) on a Jetson."""
    rails = []
    for d in glob.glob(os.path.join(HWMON, "hwmon*")):
        try:
            with open(os.path.join(d, "name")) as f:
                if f.read().strip() != "ina3221":
                    continue
        except OSError:
            continue
        rails += sorted(glob.glob(os.path.join(d, "in*_input")))
    rails += sorted(glob.glob("/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input"))
    return rails


def probe_jetson() -> Probe:
    rails = jetson_rails()
    if not rails:
        return Probe("jetson", False, "no INA3221 power monitor in sysfs (not a Jetson)")
    readable = [r for r in rails if os.access(r, os.R_OK)]
    if not readable:
        return Probe("jetson", False, f"{len(rails)} INA3221 rails found but none readable (run as root?)")
    return Probe("jetson", True, f"{len(readable)} INA3221 rails", Reading.POWER)


def rapl_domains() -> list[str]:
    return sorted(glob.glob(os.path.join(POWERCAP, "intel-rapl:*", "energy_uj")))


def probe_rapl() -> Probe:
    domains = rapl_domains()
    if not domains:
        return Probe("rapl", False, f"no RAPL domains under {POWERCAP} (virtual machine or unsupported CPU)")
    for d in domains:
        try:
            with open(d) as f:
                int(f.read())
            return Probe("rapl", True, f"{len(domains)} RAPL domain(s), first {d}", Reading.COUNTER)
        except (OSError, ValueError):
            continue
    return Probe("rapl", False, f"{len(domains)} RAPL domain(s) found but energy_uj is not readable (needs root)")


PROBES = {"nvml": probe_nvml, "jetson": probe_jetson, "rapl": probe_rapl}


def probe_all() -> list[Probe]:
    return [p() for p in PROBES.values()]
