"""Measurements of the device: energy sources, accelerators and the device fingerprint."""
