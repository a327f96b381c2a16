"""Benchmarks by name or by path.

``arith`` is the built-in evaluation split (``edgetts/data/arith_eval.jsonl``).  Any other
argument is a path to a local JSONL file in one of two common shapes:

* GSM8K style: ``{"question": ..., "answer": "...worked solution...\\n#### 42"}``; the gold
  answer is the text after the last ``####``;
* MATH-500 style: ``{"problem": ..., "answer": "\\frac{1}{2}"}``.

Optional fields kept when present: ``id`` (else ``<file stem>-<line>``) and ``level``.
A missing file, a line that is not JSON, or a record without the needed fields raises
:class:`DatasetError` naming the file and line.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from edgetts.fileio import not_a_file

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN = {"arith": DATA_DIR / "arith_eval.jsonl"}


class DatasetError(ValueError):
    """A benchmark file that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str
    level: int | str | None = None
    meta: dict = field(default_factory=dict, compare=False)


def _parse_record(rec: object, where: str, default_id: str) -> Example:
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = rec.get("question", rec.get("problem"))
    answer = rec.get("answer")
    if isinstance(question, str) and not question.strip():
        raise DatasetError(f"{where}: the {'question' if 'question' in rec else 'problem'} is empty")
    if not isinstance(question, str):
        raise DatasetError(f"{where}: missing 'question' (GSM8K style) or 'problem' (MATH style)")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if not math.isfinite(answer):
            raise DatasetError(f"{where}: 'answer' is {answer}; expected a string or a finite number")
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DatasetError(f"{where}: missing 'answer'")
    if "question" in rec and "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    answer = answer.strip().replace(",", "") if "question" in rec else answer.strip()
    level, ident = rec.get("level"), rec.get("id", default_id)
    if not (level is None or isinstance(level, str) or (isinstance(level, (int, float)) and not isinstance(level, bool)
                                                         and math.isfinite(level))):  # fmt: skip
        raise DatasetError(f"{where}: 'level' is {json.dumps(level)[:40]}; expected a number or a string")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise DatasetError(f"{where}: 'id' is {json.dumps(ident)[:40]}; expected a string or an integer")
    for name, text in (("question", question), ("answer", answer), ("id", str(ident)), ("level", str(level))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DatasetError(f"{where}: '{name}' holds invalid Unicode (a lone surrogate)") from None
    return Example(str(ident), question, answer, level, rec)


def read_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {not_a_file(path)}")
    out: list[Example] = []
    seen: dict[str, int] = {}  # id -> line: a profile's records are keyed by id
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise DatasetError(f"{where}: not valid JSON ({getattr(e, 'msg', 'nested too deep')})") from None
                out.append(_parse_record(rec, where, f"{path.stem}-{n}"))
                if out[-1].id in seen:
                    raise DatasetError(f"{where}: id {out[-1].id!r} is also line {seen[out[-1].id]}'s; each "
                                       "problem needs its own id (or none: the line number)")  # fmt: skip
                seen[out[-1].id] = n
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise DatasetError(f"{path}: no records")
    return out


def load_dataset(name_or_path: str, limit: int | None = None, seed: int | None = None) -> list[Example]:
    """Examples of a built-in benchmark or a JSONL file.

    With ``seed`` the examples are shuffled (reproducibly) before ``limit`` applies, and for
    leveled benchmarks the limit is spread evenly over levels so every level stays measured.
    """
    path = BUILTIN.get(name_or_path, Path(name_or_path))
    if name_or_path not in BUILTIN and not path.exists() and "/" not in name_or_path and "." not in name_or_path:
        raise DatasetError(f"{name_or_path}: not a built-in benchmark ({', '.join(BUILTIN)}) nor a file")
    examples = read_jsonl(path)
    if seed is not None:
        random.Random(seed).shuffle(examples)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be at least 1, got {limit}")
        examples = _spread(examples, limit)
    return examples


def _spread(examples: list[Example], limit: int) -> list[Example]:
    """The first ``limit`` examples, taken round-robin over levels when there are levels."""
    levels: dict = {}
    for ex in examples:
        levels.setdefault(ex.level, []).append(ex)
    if len(levels) <= 1:
        return examples[:limit]
    out: list[Example] = []
    queues = [list(v) for _, v in sorted(levels.items(), key=lambda kv: str(kv[0]))]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out
