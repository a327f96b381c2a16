"""Answer extraction and grading for math-style benchmarks.

Extraction works on the text after the reasoning: a ``<think>...</think>`` block is removed
(and when only the closing tag is present, because the prompt opened the block, everything
before it; when the block never closes, everything after the opening tag).  The final answer
is then the first of these that matches, each taken at its last occurrence:
``#### x``, ``\\boxed{x}``, ``the answer is x``, and finally the last number in the text.

Equivalence is decided numerically when both sides read as numbers (commas, ``$``,
fractions and decimals are normalised), otherwise through math-verify (LaTeX, sets,
symbolic forms).  math-verify's own timeouts use ``signal``, which only works in the main
thread, so they are turned off here and inputs are length-capped instead; that makes
:func:`grade` safe to call from worker threads.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

MAX_ANSWER_CHARS = 200
_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$?\s*", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_LAST_NUM = re.compile(_NUM)

logging.getLogger("math_verify").setLevel(logging.ERROR)


def strip_thinking(text: str, think_start: str = "<think>", think_end: str = "</think>") -> str:
    """The text outside the reasoning block (empty when the block never closed)."""
    if think_end and think_end in text:
        return text.rsplit(think_end, 1)[1]
    if think_start and think_start in text:
        return text.split(think_start, 1)[0]
    return text


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces (or ``\\fbox``)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else text[i:].strip() or None


def _clean(ans: str) -> str:
    ans = ans.strip().rstrip(".").strip()
    return ans[:MAX_ANSWER_CHARS]


def extract_answer(text: str, think_start: str = "<think>", think_end: str = "</think>") -> str | None:
    """The final answer stated in ``text``, or None when it states none."""
    body = strip_thinking(text, think_start, think_end)
    hashes = _HASHES.findall(body)
    if hashes:
        return _clean(hashes[-1])
    boxed = _last_boxed(body)
    if boxed:
        return _clean(boxed)
    said = list(_ANSWER_IS.finditer(body))
    if said:
        rest = re.split(r"[\n$]", body[said[-1].end() :], maxsplit=1)[0]
        first = _LAST_NUM.search(rest)
        # "The answer is 42 apples." -> "42"; "The answer is x^2" stays symbolic.
        if first and first.start() == 0:
            return _clean(first.group(0))
        if rest.strip():
            return _clean(rest)
    nums = _LAST_NUM.findall(body)
    return _clean(nums[-1]) if nums else None


def _as_number(s: str) -> Fraction | None:
    t = s.strip().strip("$").replace(",", "").replace(" ", "")
    t = re.sub(r"^\\?(?:text\{)?", "", t) if t.startswith("\\text{") else t
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", t)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if re.fullmatch(_NUM, t):
        try:
            return Fraction(t)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` and ``gold`` denote the same value."""
    if pred is None:
        return False
    pred, gold = pred[:MAX_ANSWER_CHARS], gold[:MAX_ANSWER_CHARS]
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return a == b or abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    if pred.strip() == gold.strip():
        return True
    return _math_verify(pred, gold)


def _math_verify(pred: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # the numeric path above already handled plain numbers
        return False
    try:
        g = parse(f"${gold}$", parsing_timeout=None)
        p = parse(f"${pred}$", parsing_timeout=None)
        return bool(g and p and verify(g, p, timeout_seconds=None))
    except Exception:  # a parser crash on odd text means "not equal", never a crash
        return False


def grade(completion: str, gold: str, think_start: str = "<think>", think_end: str = "</think>") -> bool:
    """Whether the answer stated in ``completion`` equals ``gold``."""
    return is_equivalent(extract_answer(completion, think_start, think_end), gold)
