"""Exports of a Pareto config for programs that are not Python."""
