import threading

import pytest

from edgetts.tasks.grading import extract_answer, grade, is_equivalent, strip_thinking


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>12+5=17</think>\nThe answer is 17", "17"),
        ("12+5=17\n</think>\nThe answer is 17.", "17"),  # prompt opened the block
        ("<think>I think 99 is wrong, so 3", None),  # unterminated block: no answer outside it
        ("So the total is 1,234 apples.", "1,234"),
        ("Work...\n#### 72", "72"),
        ("#### 5\nlater text mentions 9", "5"),  # #### beats the last number
        ("First \\boxed{3}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}+{b}} done", "{a}+{b}"),  # nested braces
        ("The answer is: 42 apples", "42"),
        ("the answer is x^2+1", "x^2+1"),
        ("the answer is 5. The answer is 6", "6"),  # last statement wins
        ("-3 and then -7.5", "-7.5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_strip_thinking_cases():
    assert strip_thinking("<think>a</think>b") == "b"
    assert strip_thinking("a</think>b</think>c") == "c"
    assert strip_thinking("before<think>never closed") == "before"
    assert strip_thinking("plain") == "plain"


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        ("1,234", "1234", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "0.5", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("$12$", "12", True),
        ("12.0", "12", True),
        ("13", "12", False),
        ("-4", "4", False),
        ("\\sqrt{4}", "2", True),
        ("x^2+1", "1+x^2", True),
        ("\\pi", "3", False),
        (None, "3", False),
        ("1/0", "1", False),
    ],
)
def test_equivalence(pred, gold, same):
    assert is_equivalent(pred, gold) is same


def test_grade_uses_text_after_thinking():
    assert grade("<think>maybe 41</think> The answer is 42", "42")
    assert not grade("<think>The answer is 42</think> The answer is 41", "42")


def test_grade_is_thread_safe():
    cases = [("The answer is \\frac{1}{2}", "0.5", True), ("\\boxed{x^2+1}", "1+x^2", True), ("#### 7", "8", False)]
    errors, results = [], []

    def work():
        try:
            for _ in range(5):
                for text, gold, want in cases:
                    results.append(grade(text, gold) is want)
        except Exception as e:  # pragma: no cover - a failure is reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 60 and all(results)
