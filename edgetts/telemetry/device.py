"""The device fingerprint written into every profile (``device.json``).

CPU model, cores and memory from ``/proc``; GPU model, memory and driver through NVML when
present; Jetson release, power mode (``nvpmodel -q``) and clocks where readable (under
``EDGETTS_SYSFS_ROOT``, :mod:`edgetts.telemetry.sysfs`); llama.cpp's devices and whether it can
offload; versions of
Python, edgetts and the engines.  Everything unreadable is recorded as ``null``, not guessed.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

from edgetts.telemetry import sysfs


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> str | None:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def proc_kb(path: str, key: str) -> int | None:
    """A ``Key:   1234 kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in kB, or None."""
    for line in (_read(path) or "").splitlines():
        if line.startswith(key + ":"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def memory_mb() -> int | None:
    total = proc_kb("/proc/meminfo", "MemTotal")
    return None if total is None else total // 1024


def gpus() -> list[dict]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: no NVIDIA GPU to report
        return []
    out = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_mb": pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20,
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
            })  # fmt: skip
    finally:
        pynvml.nvmlShutdown()
    return out


def power_mode_query() -> tuple[str, int | None] | None:
    """The Jetson's power mode as ``nvpmodel -q`` reports it: its name (``MAXN``, ``15W``...) from the
    ``NV Power Mode:`` line and its number (what ``nvpmodel -m`` takes) from the line after it; None
    where there is no Jetson or nvpmodel cannot be read."""
    if sysfs.read_text(sysfs.path("/etc/nv_tegra_release")) is None:
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines()]
    for k, line in enumerate(lines):
        if "power mode" in line.lower() and ":" in line:
            name = line.split(":", 1)[1].strip()
            after = lines[k + 1] if k + 1 < len(lines) else ""
            return (name, int(after) if after.isdigit() else None) if name else None
    return None


def with_power_mode(settings: dict) -> dict:
    """An engine's run-time settings with this device's power mode, where it has one (a Jetson): its name,
    and its number (``power_mode_id``) where ``nvpmodel -q`` gives one."""
    mode = power_mode_query()
    if mode is None:
        return dict(settings)
    return {**settings, "power_mode": mode[0], **({"power_mode_id": mode[1]} if mode[1] is not None else {})}


def jetson() -> dict | None:
    release = sysfs.read_text(sysfs.path("/etc/nv_tegra_release"))
    if release is None:
        return None
    clocks = {}
    for name, path in (("cpu0_khz", "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"),
                       ("gpu_hz", "/sys/devices/gpu.0/devfreq/17000000.ga10b/cur_freq")):  # fmt: skip
        clocks[name] = sysfs.read_int(sysfs.path(path))
    mode = power_mode_query()
    return {"release": release.splitlines()[0].strip() if release else None, "power_mode": mode and mode[0],
            "power_mode_id": mode and mode[1], "clocks": clocks}


def llama_devices() -> dict | None:
    """llama.cpp's answer to "can you offload", and the devices it registered (None without llama.cpp)."""
    try:
        from edgetts.engines import offload

        return {"offload": offload.supports_offload(), "devices": offload.backends()}
    except Exception:  # no llama-cpp-python, or a build without these calls: nothing to report
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fingerprint() -> dict:
    return {
        "hostname": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_mb": memory_mb(),
        "gpus": gpus(),
        "jetson": jetson(),
        "llama_cpp": llama_devices(),
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("edgetts", "llama-cpp-python", "onnxruntime-genai", "nvidia-ml-py")},
        },
    }
