"""Pareto configs: the frontier of accuracy against latency, written once, read by every runtime."""

from edgetts.pareto.config import SCHEMA, ParetoError, build_config, load_config, write_config

__all__ = ["SCHEMA", "ParetoError", "build_config", "load_config", "write_config"]
