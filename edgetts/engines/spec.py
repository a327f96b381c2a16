"""Engine specs, and the one place an engine is opened.

A spec says which engine runs a model and how: the registry ``engine`` name, the ``artifact``
it runs (a GGUF file, an ONNX Runtime GenAI directory, a TensorRT plan, or a built-in name
such as ``tiny``; for a server, the model name the server knows), the ``url`` of a server,
and engine ``options`` (``threads``, ``gpu_layers``, ``provider``, ``parallel``...; ``family``
overrides the guessed reasoning format).  Sweeps, profile records, Pareto points and the
runtime carry specs as plain dicts (:meth:`EngineSpec.to_dict`, :meth:`EngineSpec.from_dict`),
so whatever engine a Pareto point names can be opened again anywhere.

:func:`open_engine` is the only constructor callers use.  It

1. resolves ``engine="auto"`` from the artifact's format (``FORMATS`` in :mod:`edgetts.engines`),
2. checks the options against what the engine class accepts (``Engine.options``),
3. sizes the context from what the caller will decode (:class:`ContextPlan`: the prompt once,
   plus every row's sampled tokens, forced text and probe branches),
4. refuses, before loading anything, a plan that needs more memory than the device has free
   (:mod:`edgetts.engines.memory`, for engines whose class has ``memory_plan``), then opens the
   engine through its class's :meth:`~edgetts.engines.base.Engine.open`, and
5. guesses the reasoning family from the model (name, GGUF ``general.name``, chat template).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgetts.engines.base import Engine, EngineError
from edgetts.models.families import FAMILIES, Family, guess_family

PROMPT_RESERVE = 512  # tokens of the largest prompt a planned engine expects (chat template included)
FORCED_SLACK = 32  # forced tokens per row: end of thinking, answer prefix, a "Wait" or two
GENERIC_OPTIONS = {"family": str}  # options every engine takes
# Run-time settings of a device: how an engine runs there, not what it computes.  A profile records
# them (with flash attention and the power mode) as ``profiled_with``; Pareto points carry the
# options without them, and the runtime takes the user's, or this device's defaults.
SETTINGS = ("threads", "gpu_layers")
# llama.cpp's thread pools hold at most GGML_MAX_N_THREADS threads; asked for far more, it crashes the process.
MAX_THREADS = 512


@dataclass(frozen=True)
class ContextPlan:
    """What one engine call may decode at most; engines size their caches from it."""

    max_rows: int = 1
    max_tokens: int = 256  # sampled tokens per row (thinking + answer)
    prompt_tokens: int = PROMPT_RESERVE
    probe_tokens: int = 0  # per row, for branches that tell what a row would answer if cut

    def __post_init__(self):
        for name in ("max_rows", "max_tokens", "prompt_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise EngineError(f"{name} must be a positive integer, got {v!r}")

    @property
    def n_ctx(self) -> int:
        """Cache cells: the shared prompt once, then each row's own tokens and its probe branch."""
        per_row = self.max_tokens + FORCED_SLACK + self.probe_tokens
        return int(64 * math.ceil((self.prompt_tokens + self.max_rows * per_row) / 64))

    @property
    def split_n_ctx(self) -> int:
        """Cache cells with a stream per row: each stream its own copy of the prompt and its row's
        tokens (no probe branches: they need a unified cache)."""
        return self.max_rows * (self.prompt_tokens + self.max_tokens + FORCED_SLACK)


@dataclass(frozen=True)
class EngineSpec:
    engine: str = "auto"
    artifact: str | None = None
    url: str | None = None
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"engine": self.engine, "artifact": self.artifact}
        if self.url:
            d["url"] = self.url
        if self.options:
            d["options"] = dict(sorted(self.options.items()))
        return d

    @classmethod
    def from_dict(cls, d: object, where: str = "engine spec") -> EngineSpec:
        if isinstance(d, str):
            return cls(artifact=d)
        if not isinstance(d, dict):
            raise EngineError(f"{where}: expected a model name, a path or a mapping, got {d!r}")
        unknown = set(d) - {"engine", "artifact", "model", "url", "options"}
        if unknown:
            raise EngineError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        artifact = d.get("artifact", d.get("model"))
        options = d.get("options") or {}
        if not isinstance(options, dict):
            raise EngineError(f"{where}.options: expected a mapping, got {options!r}")
        for key, value in (("engine", d.get("engine", "auto")), ("artifact", artifact), ("url", d.get("url"))):
            if value is not None and (not isinstance(value, str) or not value):
                raise EngineError(f"{where}.{key}: expected a non-empty string, got {value!r}")
        return cls(d.get("engine") or "auto", artifact, d.get("url"), dict(options))

    @property
    def label(self) -> str:
        """How records and Pareto points name this model: the artifact for local engines, else engine and URL."""
        if self.url:
            return f"{self.engine}:{self.artifact or ''}@{self.url}"
        if self.engine in ("auto", "llama.cpp"):
            return self.artifact or ""
        return f"{self.engine}:{self.artifact}"

    def resolved(self) -> EngineSpec:
        """This spec with ``engine="auto"`` replaced by the engine of the artifact's format."""
        if self.engine != "auto":
            return self
        if self.url:
            return EngineSpec("openai-http", self.artifact, self.url, self.options)
        if not self.artifact:
            raise EngineError("an engine spec needs a model artifact or a server URL")
        from edgetts.engines import FORMATS

        return EngineSpec(FORMATS[artifact_format(self.artifact)], self.artifact, None, self.options)

    def with_options(self, **defaults) -> EngineSpec:
        """The spec with ``defaults`` added where its engine takes them and it has none of its own."""
        from edgetts.engines import engine_class

        spec = self.resolved()
        accepted = engine_class(spec.engine).options
        extra = {k: v for k, v in defaults.items() if v is not None and k in accepted and k not in spec.options}
        return EngineSpec(spec.engine, spec.artifact, spec.url, {**spec.options, **extra}) if extra else spec


def split_settings(spec: EngineSpec) -> tuple[EngineSpec, dict]:
    """``spec`` without its run-time settings, and those settings."""
    settings = {k: v for k, v in spec.options.items() if k in SETTINGS}
    if not settings:
        return spec, {}
    options = {k: v for k, v in spec.options.items() if k not in SETTINGS}
    return EngineSpec(spec.engine, spec.artifact, spec.url, options), settings


def settings_note(what: str, profiled: dict | None, running: dict) -> str | None:
    """One line saying where ``running`` differs from the settings ``what`` was profiled with, or None."""
    if not profiled:
        return None
    if profiled.get("power_mode") is not None and "power_mode" not in running:  # profiled on a Jetson, run elsewhere
        running = {**running, "power_mode": "none (no Jetson here)"}
    keys = [k for k in (*SETTINGS, "offload", "flash_attn", "power_mode") if k in profiled and k in running]
    diff = [k for k in keys if profiled[k] != running[k]]
    if not diff:
        return None
    was = ", ".join(f"{k}={profiled[k]}" for k in diff)
    now = ", ".join(f"{k}={running[k]}" for k in diff)
    return f"note: {what}: latencies were profiled with {was}; running with {now}"


def serving_threads() -> int | None:
    """Threads for llama.cpp where Python works beside it (serve, profile): all cores but one.

    None when ``EDGETTS_THREADS`` is set (the engine then takes it).  The spare core keeps the
    Python side (HTTP loop, controllers, meters) from descheduling a llama.cpp thread, which
    would stall every step; profiles measure with the same count the server runs with.
    """
    import os

    if os.environ.get("EDGETTS_THREADS", "").strip():
        return None
    return max(1, (os.cpu_count() or 2) - 1)


def artifact_format(artifact: str) -> str:
    """``gguf``, ``onnx`` or ``tensorrt``, read from the file (a built-in name means its GGUF)."""
    from edgetts.models import BUILTIN

    if artifact in BUILTIN:
        return "gguf"
    p = Path(artifact).expanduser()
    if p.is_dir():
        if (p / "genai_config.json").is_file():
            return "onnx"
        if (p / "model.plan").is_file():
            return "tensorrt"
        raise EngineError(f"{p}: is a directory, and neither an ONNX model (genai_config.json) "
                          "nor a TensorRT plan (model.plan)")
    if p.suffix == ".plan":
        return "tensorrt"
    if p.is_file():
        with p.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise EngineError(f"{p}: not a GGUF file (bad magic bytes), nor an ONNX or TensorRT model directory")
    if p.exists():
        raise EngineError(f"{p}: not a regular file or directory")
    raise EngineError(f"model {artifact!r}: no such file, and not a built-in name")


def check_options(spec: EngineSpec, cls: type[Engine]) -> None:
    accepted = {**GENERIC_OPTIONS, **cls.options}
    for key, value in spec.options.items():
        if key not in accepted:
            takes = ", ".join(sorted(accepted))
            raise EngineError(f"engine {spec.engine!r} takes no option {key!r}; it takes: {takes}")
        kind = accepted[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        ok = ok and not (isinstance(value, bool) and kind is not bool)
        if value is not None and not ok:
            raise EngineError(f"engine option {key!r} must be {kind.__name__}, got {value!r}")
    family = spec.options.get("family")
    if family is not None and family not in FAMILIES:
        raise EngineError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")


def engine_memory(spec: EngineSpec | dict | str, plan: ContextPlan):
    """The :class:`~edgetts.engines.memory.MemoryPlan` of opening ``spec`` for ``plan``, or None when the
    engine cannot tell (its memory lives elsewhere: a server, or a runtime that sizes itself)."""
    from edgetts.engines import engine_class

    if not isinstance(spec, EngineSpec):
        spec = EngineSpec.from_dict(spec)
    spec = spec.resolved()
    planner = getattr(engine_class(spec.engine), "memory_plan", None)
    return planner(spec, plan) if planner is not None else None


def open_engine(spec: EngineSpec | dict | str, max_rows: int = 1, max_tokens: int = 256,
                prompt_tokens: int = PROMPT_RESERVE, probe_tokens: int = 0, memory_mb: float | None = None,
                hint: str | None = None) -> tuple[Engine, Family]:  # fmt: skip
    """The engine a spec names, sized for ``max_rows`` rows of ``max_tokens`` sampled tokens, and its family.

    ``memory_mb`` caps the memory the plan may take (default: what the device has free); ``hint``
    replaces the advice of the one-line refusal when it does not fit.
    """
    from edgetts.engines import engine_class

    if not isinstance(spec, EngineSpec):
        spec = EngineSpec.from_dict(spec)
    spec = spec.resolved()
    cls = engine_class(spec.engine)
    check_options(spec, cls)
    if cls.needs_url and not spec.url:
        raise EngineError(f"engine {spec.engine!r} needs a server URL (--url)")
    if not cls.needs_url and not spec.artifact:
        raise EngineError(f"engine {spec.engine!r} needs a model artifact (--model)")
    plan = ContextPlan(max_rows, max_tokens, prompt_tokens, probe_tokens)
    memory = engine_memory(spec, plan)
    if memory is not None:
        from edgetts.engines.memory import check_fits

        check_fits(memory, f"{spec.label} for {max_rows} row(s) x {max_tokens} tokens", memory_mb,
                   **({"hint": hint} if hint else {}))  # fmt: skip
    engine = cls.open(spec, plan)
    family = spec.options.get("family")
    if family is None:
        return engine, guess_family(spec.artifact or "", engine.chat_template(), engine.model_name())
    return engine, FAMILIES[family]
