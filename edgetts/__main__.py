"""``python -m edgetts`` is the ``edgetts`` command."""

from edgetts.cli import app

app()
