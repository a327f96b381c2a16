"""``edgetts doctor``: what this machine offers edgetts.

Engines are reported as importable or not, with versions; accelerators through NVML, the
Jetson release file and llama.cpp's own answer to whether it can offload (with the devices
ggml registered); energy sources through :mod:`edgetts.telemetry.energy`; and the
built-in model and benchmark with their sizes, so a broken install shows at once.
"""

from __future__ import annotations

import importlib
import os
import platform
from importlib import metadata

from edgetts.models import BUILTIN, BUILTIN_HF
from edgetts.tasks.datasets import BUILTIN as BUILTIN_DATA
from edgetts.telemetry.device import jetson, llama_devices
from edgetts.telemetry.energy import probe_all, probe_nvml

ENGINE_MODULES = {
    "llama.cpp": ("llama_cpp", "llama-cpp-python"),
    "onnx-genai": ("onnxruntime_genai", "onnxruntime-genai"),
    "openai-http": ("httpx", "httpx"),
    "tensorrt": ("tensorrt", "tensorrt"),
}
# How to get each engine's module: the package's extra, or where NVIDIA ships it.
INSTALL = {
    "llama.cpp": "pip install edgetts (llama-cpp-python builds with a C/C++ compiler and CMake)",
    "onnx-genai": "pip install 'edgetts[onnx]'",
    "openai-http": "pip install 'edgetts[http]'",
    "tensorrt": "TensorRT from JetPack on a Jetson, or pip install tensorrt on a CUDA machine",
}


def _engine(name: str, module: str, dist: str) -> dict:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == module.split(".")[0]:  # the engine's own package is missing
            return {"name": name, "available": False, "detail": f"not installed: {INSTALL[name]}"}
        return {"name": name, "available": False, "detail": f"{dist} needs {e.name}: {INSTALL[name]}"}
    except Exception as e:  # a broken native library can raise anything on import
        why = " ".join(str(e).split())[:200]
        return {"name": name, "available": False, "detail": f"installed but broken ({type(e).__name__}: {why})"}
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": name, "available": True, "version": version}


def jetson_release() -> str | None:
    """The Jetson's release line, with its power mode as ``nvpmodel -q`` reports it (name and the number
    ``nvpmodel -m`` and ``edgetts calibrate --setting power_mode=`` take), or None on another machine."""
    found = jetson()
    if found is None:
        return None
    name, number = found["power_mode"], found["power_mode_id"]
    said = f"{name} (mode {number})" if number is not None else name or "unread"
    return f"{found['release']}; power mode {said}"


def llama_offload() -> dict:
    """Whether llama.cpp can offload layers (its own answer), and the devices it registered."""
    devices = llama_devices()
    if devices is None:
        return {"offload": False, "devices": [], "detail": "llama-cpp-python is not importable"}
    names = ", ".join(f"{d['name']} ({d['type']})" for d in devices["devices"]) or "none listed"
    if devices["offload"]:
        detail = f"can offload: gpu_layers auto puts every layer on the GPU; devices {names}"
    else:
        detail = f"cannot offload (no GPU backend in this build): runs on the CPU; devices {names}"
    return {**devices, "detail": detail}


def _file(path) -> dict:
    return {"path": str(path), "exists": path.exists(), "bytes": path.stat().st_size if path.exists() else None}


def report() -> dict:
    nvml = probe_nvml()
    return {
        "platform": {
            "system": platform.system(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "engines": [_engine(n, m, d) for n, (m, d) in ENGINE_MODULES.items()],
        "accelerators": {
            "cuda_nvml": nvml.to_dict(),
            "jetson": jetson_release() or "not a Jetson (/etc/nv_tegra_release absent)",
            "llama_cpp": llama_offload(),
        },
        "energy_sources": [p.to_dict() for p in probe_all()],
        "builtin": {
            "models": {k: _file(v) for k, v in BUILTIN.items()},
            "hf_models": {k: _file(v / "model.safetensors") for k, v in BUILTIN_HF.items()},
            "benchmarks": {k: _file(v) for k, v in BUILTIN_DATA.items()},
        },
    }
