"""The on-device runtime: pick a frontier point per request under its deadline."""

from edgetts.runtime.policy import Policy, Selection

__all__ = ["Policy", "Selection"]
