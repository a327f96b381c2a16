"""Reading the small YAML files users write (sweeps, recipes) with one-line errors."""

from __future__ import annotations

from pathlib import Path

from edgetts.fileio import not_a_file


def load_mapping(path: str | Path, allowed: set[str], error: type[Exception], what: str) -> dict:
    """The mapping in ``path``; a missing file, bad YAML, a non-mapping or an unknown key raises ``error``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {not_a_file(path, what)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise error(f"{path}: not valid YAML (nested too deep)") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what} options")
    unknown = {str(k) for k in data} - allowed
    if unknown:
        raise error(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    return data
