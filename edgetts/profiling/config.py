"""The sweep configuration: what a profile measures, validated, with a stable fingerprint.

A sweep comes from a YAML file (``--config``) or from command-line flags; both produce the
same :class:`SweepConfig`.  ``resolved()`` is what is written to ``sweep.json`` in the profile
directory, and its hash decides whether an existing directory belongs to this sweep (resume)
or to another one (refused unless ``--force``).

YAML shape (every key optional)::

    models: [tiny]                 # built-in names, GGUF files, ONNX directories, quantize manifests,
                                   # or engine specs: {engine: onnx-genai, artifact: DIR, options: {...}}
    engine:                        # defaults for every model
      name: auto                   # auto (from the artifact), llama.cpp, onnx-genai, openai-http, tensorrt
      url: null                    # an OpenAI-compatible server (openai-http); models then name its model
      n_ctx: 0                     # 0: sized from the largest cell
      threads: 2                   # default: all cores but one (EDGETTS_THREADS when set)
      gpu_layers: auto             # auto: every layer where llama.cpp can offload; -1 all; N layers
      options: {}                  # engine options, e.g. {provider: cuda} or {parallel: n}
    dataset: arith
    limit: 50                      # problems, spread evenly over levels
    seed: 0
    strategies: [single, majority, esc]
    budgets: [32, 64, 128]
    n: [1, 4, 8]                   # parallelism levels (single-row strategies use 1)
    repeats: 1
    warmup: 2                      # untimed queries before the first cell of each model
    mode: pooled                   # or direct: every cell run as in production
    temperature: 1.0
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetts.engines import REGISTRY, EngineError, EngineSpec
from edgetts.strategies import STRATEGIES

MODES = ("pooled", "direct")
MAX_SEED = 2**32 - 1  # as run's --seed (row seeds wrap at 2**32, engines.base.draw_seed)


class ConfigError(ValueError):
    """A sweep configuration that cannot run; the message names the field."""


@dataclass
class EngineOptions:
    name: str = "auto"
    url: str | None = None
    n_ctx: int = 0  # 0: sized from the largest cell
    threads: int | None = None
    gpu_layers: int | str | None = None  # None or "auto": every layer where llama.cpp can offload
    options: dict = field(default_factory=dict)

    def defaults(self) -> dict:
        """Options applied to every model whose engine takes them."""
        from edgetts.engines.offload import parse_gpu_layers
        from edgetts.engines.spec import serving_threads

        return {"n_ctx": self.n_ctx or None, "threads": self.threads or serving_threads(),
                "gpu_layers": parse_gpu_layers(self.gpu_layers), **self.options}  # fmt: skip


@dataclass
class SweepConfig:
    models: list = field(default_factory=lambda: ["tiny"])
    engine: EngineOptions = field(default_factory=EngineOptions)
    dataset: str = "arith"
    limit: int | None = 50
    seed: int = 0
    strategies: list[str] = field(default_factory=lambda: ["single", "majority", "esc"])
    budgets: list[int] = field(default_factory=lambda: [32, 64, 128])
    n: list[int] = field(default_factory=lambda: [1, 4, 8])
    repeats: int = 1
    warmup: int = 2
    mode: str = "pooled"
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.engine, dict):
            unknown = set(self.engine) - set(EngineOptions.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"engine: unknown option(s) {', '.join(sorted(map(str, unknown)))}")
            self.engine = EngineOptions(**self.engine)
        if not isinstance(self.engine, EngineOptions):
            raise ConfigError(f"engine: expected a mapping of engine options, got {self.engine!r}")
        self.validate()

    def validate(self) -> None:
        def ints(name, values, lo=1):
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in values):
                raise ConfigError(f"{name}: expected a non-empty list of integers >= {lo}, got {values!r}")
            once(name, values)

        def once(name, values):  # a value given twice would measure its cells twice, into one record each
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise ConfigError(f"{name}: {twice!r} is given twice")

        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError(f"dataset: expected a built-in benchmark's name or a JSONL file, got {self.dataset!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: expected a whole number from 0 to {MAX_SEED}, got {self.seed!r}")
        if not isinstance(self.models, list) or not self.models:
            raise ConfigError(f"models: expected a non-empty list of names, paths or engine specs, got {self.models!r}")
        e = self.engine
        if e.name != "auto" and e.name not in REGISTRY:
            raise ConfigError(f"engine.name: unknown engine {e.name!r}; choose auto or one of: {', '.join(REGISTRY)}")
        if e.url is not None and (not isinstance(e.url, str) or not e.url.startswith(("http://", "https://"))):
            raise ConfigError(f"engine.url: expected an http:// or https:// URL, got {e.url!r}")
        if not isinstance(e.options, dict):
            raise ConfigError(f"engine.options: expected a mapping, got {e.options!r}")
        try:
            from edgetts.engines.offload import parse_gpu_layers

            parse_gpu_layers(e.gpu_layers)
        except EngineError as err:
            raise ConfigError(f"engine.{err}") from None
        for i, m in enumerate(self.models):
            try:
                EngineSpec.from_dict(m, f"models[{i}]")
            except EngineError as err:
                raise ConfigError(str(err)) from None
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or bad:
            what = f"unknown {bad!r}" if bad else "expected a non-empty list"
            raise ConfigError(f"strategies: {what}; choose from {', '.join(STRATEGIES)}")
        once("strategies", self.strategies)
        once("models", self.models)
        ints("budgets", self.budgets)
        ints("n", self.n)
        ints("repeats", [self.repeats])
        ints("warmup", [self.warmup], lo=0)
        if self.limit is not None:
            ints("limit", [self.limit])
        if self.mode not in MODES:
            raise ConfigError(f"mode: {self.mode!r} is not available; choose from {', '.join(MODES)}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature: expected a number >= 0, got {self.temperature!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        from edgetts.yamlfile import load_mapping

        data = load_mapping(path, set(cls.__dataclass_fields__), ConfigError, "sweep")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def override(self, threads: int | None = None, engine: str | None = None, url: str | None = None,
                 engine_options: dict | None = None, gpu_layers: int | str | None = None,
                 **fields) -> SweepConfig:  # fmt: skip
        """This sweep with every given (not None) field replaced, as command-line flags do; validated."""
        for name, value in fields.items():
            if name not in self.__dataclass_fields__:
                raise ConfigError(f"unknown sweep field {name!r}")
            if value is not None:
                setattr(self, name, value)
        e = self.engine
        e.threads = threads or e.threads
        e.gpu_layers = e.gpu_layers if gpu_layers is None else gpu_layers
        e.name = engine or e.name
        e.url = url or e.url
        e.options = {**e.options, **(engine_options or {})}
        self.validate()
        return self

    def cells(self) -> list[tuple[str, int, int]]:
        """(strategy, n, budget) for every configuration the sweep measures."""
        out = []
        for s in self.strategies:
            for n in [1] if STRATEGIES[s].single_row else ([n for n in self.n if n > 1] or [max(self.n)]):
                out += [(s, n, b) for b in self.budgets]
        return out

    def specs(self) -> list[EngineSpec]:
        """One engine spec per model variant: manifests expand to their artifacts (hash-checked),
        each run by the engine of its format; the sweep's engine settings fill in the rest."""
        from edgetts.engines import FORMATS

        out = []
        for i, m in enumerate(self.models):
            spec = EngineSpec.from_dict(m, f"models[{i}]")
            if spec.engine == "auto" and self.engine.name != "auto":
                spec = EngineSpec(self.engine.name, spec.artifact, spec.url, spec.options)
            if spec.url is None and self.engine.url:
                spec = EngineSpec(spec.engine, spec.artifact, self.engine.url, spec.options)
            manifest = _manifest(spec.artifact) if spec.url is None else None
            if manifest is None:
                out.append(spec.with_options(**self.engine.defaults()))
                continue
            for path, entry in _manifest_entries(manifest):
                engine = FORMATS.get(entry.get("format"))
                if engine is None:
                    continue  # a format no engine here runs
                variant = EngineSpec(engine, str(path), None, spec.options)
                out.append(variant.with_options(**self.engine.defaults()))
        labels = [s.label for s in out]
        twice = next((x for k, x in enumerate(labels) if x in labels[:k]), None)
        if twice is not None:  # its cells would be measured twice, into one record each
            raise ConfigError(f"models: {twice} comes twice (a manifest listing it twice, or it and a manifest "
                              "holding it)")  # fmt: skip
        return out

    def resolved(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]


def _manifest(artifact: str | None) -> Path | None:
    if not artifact:
        return None
    p = Path(artifact).expanduser()
    manifest = p if p.name == "manifest.json" else p / "manifest.json"
    return manifest if manifest.is_file() else None


def _manifest_entries(manifest: Path) -> list[tuple[Path, dict]]:
    from edgetts.quantization import manifest as mf

    return mf.entries(manifest)
