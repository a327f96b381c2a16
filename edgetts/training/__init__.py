"""Training code for the shipped tiny model (needs the ``train`` extra: torch, transformers)."""
