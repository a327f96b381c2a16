"""The built-in ``arith`` benchmark: seeded multi-step integer arithmetic with worked solutions.

A problem is a chain of operations evaluated left to right, for example
``Evaluate left to right: 22*5-7+68+18`` (``arith-L3-0000`` of the evaluation split).  Its
worked solution writes one line per operation (``22*5=110``, ``110-7=103``, ``103+68=171``,
``171+18=189``) and ends with the answer (``#### 189``).
Every intermediate value stays in ``[0, MAX_VALUE]`` so a line never needs negative numbers.

Difficulty grows with the number of operations (more lines to get right, each error is
fatal) and with operand size (more digits per line).  The generator is a pure function of
``(level, seed)``: the shipped evaluation split (``data/arith_eval.jsonl``) is regenerated
bit for bit by :func:`eval_split`, and training problems come from other seeds and are
filtered against the split's questions so the two never overlap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_VALUE = 999
EVAL_SEED = 20261129
EVAL_PER_LEVEL = 100


@dataclass(frozen=True)
class Level:
    """One difficulty level: how many operations, and how large the operands may be."""

    level: int
    n_ops: int
    max_operand: int
    max_multiplier: int


LEVELS: dict[int, Level] = {
    lv.level: lv
    for lv in (
        Level(1, 1, 50, 5),
        Level(2, 2, 99, 9),
        Level(3, 4, 99, 9),
        Level(4, 6, 99, 9),
        Level(5, 8, 99, 9),
    )
}


@dataclass(frozen=True)
class Problem:
    """A generated problem with its step-by-step solution."""

    id: str
    level: int
    question: str
    steps: tuple[str, ...]
    answer: int

    def solution(self) -> str:
        """The worked solution in GSM8K style: one line per step, then ``#### answer``."""
        return "\n".join(self.steps) + f"\n#### {self.answer}"

    def to_record(self) -> dict:
        return {
            "id": self.id,
            "level": self.level,
            "question": self.question,
            "steps": list(self.steps),
            "answer": str(self.answer),
        }


def _next_op(rng: random.Random, value: int, lv: Level) -> tuple[str, int]:
    """Pick an operation that keeps the running value inside [0, MAX_VALUE]."""
    choices = []
    if value + 1 <= MAX_VALUE:
        choices.append("+")
    if value >= 1:
        choices.append("-")
    if 2 * value <= MAX_VALUE and value >= 2:
        choices.append("*")
    op = rng.choice(choices)
    if op == "+":
        return op, rng.randint(1, min(lv.max_operand, MAX_VALUE - value))
    if op == "-":
        return op, rng.randint(1, min(lv.max_operand, value))
    return op, rng.randint(2, min(lv.max_multiplier, MAX_VALUE // value))


def generate(level: int, rng: random.Random, index: int = 0, prefix: str = "arith") -> Problem:
    """Draw one problem of ``level`` from ``rng``."""
    return generate_from(LEVELS[level], rng, index, prefix)


def generate_from(lv: Level, rng: random.Random, index: int = 0, prefix: str = "arith") -> Problem:
    """Draw one problem with the shape of ``lv`` (levels outside LEVELS serve training)."""
    value = rng.randint(2, lv.max_operand)
    text = [str(value)]
    steps = []
    for _ in range(lv.n_ops):
        op, operand = _next_op(rng, value, lv)
        new = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"{value}{op}{operand}={new}")
        text.append(f"{op}{operand}")
        value = new
    question = f"Evaluate left to right: {''.join(text)}"
    return Problem(f"{prefix}-L{lv.level}-{index:04d}", lv.level, question, tuple(steps), value)


def eval_split(seed: int = EVAL_SEED, per_level: int = EVAL_PER_LEVEL) -> list[Problem]:
    """The fixed evaluation split: ``per_level`` distinct problems for every level."""
    out: list[Problem] = []
    for level in LEVELS:
        rng = random.Random(f"{seed}-{level}")
        seen: set[str] = set()
        while len(seen) < per_level:
            p = generate(level, rng, len(seen))
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
    return out


def write_eval_split(path, seed: int = EVAL_SEED, per_level: int = EVAL_PER_LEVEL) -> None:
    """Write the evaluation split as JSONL; the first record's ``seed`` documents how it was made."""
    import json
    from pathlib import Path

    lines = []
    for p in eval_split(seed, per_level):
        rec = p.to_record()
        rec["seed"] = seed
        lines.append(json.dumps(rec))
    Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # python -m edgetts.tasks.arith PATH  regenerates the shipped split
    import sys

    write_eval_split(sys.argv[1] if len(sys.argv) > 1 else "edgetts/data/arith_eval.jsonl")
