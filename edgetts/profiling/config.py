"""The sweep configuration: what a profile measures, validated, with a stable fingerprint.

A sweep comes from a YAML file (``--config``) or from command-line flags; both produce the
same :class:`SweepConfig`.  ``resolved()`` is what is written to ``sweep.json`` in the profile
directory, and its hash decides whether an existing directory belongs to this sweep (resume)
or to another one (refused unless ``--force``).

YAML shape (every key optional)::

    models: [tiny]                 # built-in names or GGUF paths
    engine: {n_ctx: 0, threads: 2, gpu_layers: 0}
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetts.strategies import STRATEGIES

SINGLE_ROW = ("single", "budget-forcing", "length-hint")
MODES = ("pooled", "direct")


class ConfigError(ValueError):
    """A sweep configuration that cannot run; the message names the field."""


@dataclass
class EngineOptions:
    n_ctx: int = 0  # 0: sized from the largest cell
    threads: int | None = None
    gpu_layers: int = 0


@dataclass
class SweepConfig:
    models: list[str] = field(default_factory=lambda: ["tiny"])
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
            unknown = set(self.engine) - {"n_ctx", "threads", "gpu_layers"}
            if unknown:
                raise ConfigError(f"engine: unknown option(s) {', '.join(sorted(unknown))}")
            self.engine = EngineOptions(**self.engine)
        self.validate()

    def validate(self) -> None:
        def ints(name, values, lo=1):
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in values):
                raise ConfigError(f"{name}: expected a non-empty list of integers >= {lo}, got {values!r}")

        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError(f"models: expected a non-empty list of names or paths, got {self.models!r}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or bad:
            raise ConfigError(f"strategies: unknown {bad or self.strategies!r}; choose from {', '.join(STRATEGIES)}")
        ints("budgets", self.budgets)
        ints("n", self.n)
        ints("repeats", [self.repeats])
        ints("warmup", [self.warmup], lo=0)
        if self.limit is not None:
            ints("limit", [self.limit])
        if self.mode not in MODES:
            raise ConfigError(f"mode: {self.mode!r} is not available; choose from {', '.join(MODES)}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"temperature: expected a number >= 0, got {self.temperature!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        from edgetts.yamlfile import load_mapping

        data = load_mapping(path, set(cls.__dataclass_fields__), ConfigError, "sweep")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def cells(self) -> list[tuple[str, int, int]]:
        """(strategy, n, budget) for every configuration the sweep measures."""
        out = []
        for s in self.strategies:
            for n in [1] if s in SINGLE_ROW else ([n for n in self.n if n > 1] or [max(self.n)]):
                out += [(s, n, b) for b in self.budgets]
        return out

    def resolved(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]
