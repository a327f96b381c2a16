"""Reading the small YAML files users write (sweeps, recipes) with one-line errors."""

from __future__ import annotations

from pathlib import Path

from edgetts.fileio import not_a_file

MAX_NODES = 100_000  # values in a file, aliases expanded: ten levels of ten aliases each are 10^10


def _nodes(data, limit: int = MAX_NODES) -> int:
    """How many values ``data`` holds, counting a value each time an alias repeats it, up to just past
    ``limit`` (a YAML alias is a reference, so a file of a few lines can stand for billions of values,
    which a later walk or ``json.dumps`` would expand)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return count


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
    if _nodes(data) > MAX_NODES:
        raise error(f"{path}: holds more than {MAX_NODES:,} values once its aliases (*name) are expanded; "
                    f"a {what} file needs a few dozen")  # fmt: skip
    unknown = {str(k) for k in data} - allowed
    if unknown:
        raise error(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    return data
