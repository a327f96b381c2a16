import json
import re

import pytest

from edgetts.tasks import arith
from edgetts.tasks.datasets import BUILTIN, DatasetError, load_dataset, read_jsonl
from edgetts.tasks.grading import grade


def test_builtin_arith_has_five_levels_of_100():
    exs = load_dataset("arith")
    levels = {}
    for ex in exs:
        levels[ex.level] = levels.get(ex.level, 0) + 1
    assert levels == {1: 100, 2: 100, 3: 100, 4: 100, 5: 100}
    assert len({ex.question for ex in exs}) == 500


def test_shipped_split_is_regenerated_from_its_seed(tmp_path):
    out = tmp_path / "split.jsonl"
    seed = json.loads(BUILTIN["arith"].read_text().splitlines()[0])["seed"]
    arith.write_eval_split(out, seed=seed)
    assert out.read_text() == BUILTIN["arith"].read_text()


def test_worked_solutions_are_correct():
    step_re = re.compile(r"(\d+)([+*-])(\d+)=(\d+)")
    for p in arith.eval_split():
        value = int(re.match(r"\d+", p.question.split(": ")[1]).group(0))
        for step in p.steps:
            a, op, b, result = step_re.fullmatch(step).groups()
            assert int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(result) and 0 <= value <= arith.MAX_VALUE
        assert value == p.answer
        assert grade(p.solution(), str(p.answer))


def test_difficulty_grows_with_level():
    ops = [arith.LEVELS[lv].n_ops for lv in sorted(arith.LEVELS)]
    assert ops == sorted(ops) and len(set(ops)) == 5


def test_training_stream_never_yields_eval_questions():
    from edgetts.training.tiny import batch_stream

    eval_q = {p.question for p in arith.eval_split()}
    stream = batch_stream(seed=7, exclude=eval_q, max_ops=2, batch_size=500)
    seen = [p.question for _ in range(4) for p in next(stream)]
    assert not eval_q.intersection(seen)
    # With one or two operations collisions are frequent, so the filter is exercised.
    unfiltered = batch_stream(seed=7, exclude=set(), max_ops=2, batch_size=500)
    assert eval_q.intersection(p.question for _ in range(4) for p in next(unfiltered))


def test_gsm8k_and_math_styles(tmp_path):
    f = tmp_path / "mix.jsonl"
    f.write_text(
        json.dumps({"question": "2+2?", "answer": "Add them.\n#### 1,004"})
        + "\n\n"
        + json.dumps({"problem": "Half?", "answer": "\\frac{1}{2}", "level": "Level 3", "id": "m1"})
        + "\n"
    )
    a, b = read_jsonl(f)
    assert (a.question, a.answer, a.id) == ("2+2?", "1004", "mix-1")
    assert (b.question, b.answer, b.level, b.id) == ("Half?", "\\frac{1}{2}", "Level 3", "m1")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q", "answer": "1"}\n{not json\n', "bad.jsonl:2: not valid JSON"),
        ('{"question": "q"}\n', "bad.jsonl:1: missing 'answer'"),
        ('{"text": "q", "answer": "1"}\n', "bad.jsonl:1: missing 'question'"),
        ("[1, 2]\n", "bad.jsonl:1: expected a JSON object"),
        ("\n\n", "bad.jsonl: no records"),
        ('{"question": "q", "answer": NaN}\n', "bad.jsonl:1: 'answer' is nan; expected a string or a finite number"),
        ('{"question": "q", "answer": 1e400}\n', "bad.jsonl:1: 'answer' is inf"),
        ('{"question": "\\ud800 q", "answer": "1"}\n', "bad.jsonl:1: 'question' holds invalid Unicode"),
        ('{"question": "q", "answer": "1", "level": [1]}\n', "bad.jsonl:1: 'level' is [1]"),
        ('{"question": "q", "answer": "1", "id": {"a": 1}}\n', "bad.jsonl:1: 'id' is {\"a\": 1}"),
        ('{"question": "  ", "answer": "1"}\n', "bad.jsonl:1: the question is empty"),
        # a profile keys its records by id: two problems under one id were measured into one record
        ('{"question": "q", "answer": "1", "id": 7}\n{"question": "r", "answer": "2", "id": "7"}\n',
         "bad.jsonl:2: id '7' is also line 1's"),
        ('{"question": "q", "answer": "1", "id": "bad-2"}\n{"question": "r", "answer": "2"}\n',
         "bad.jsonl:2: id 'bad-2' is also line 1's"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DatasetError) as e:
        read_jsonl(f)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetError, match="not a built-in benchmark"):
        load_dataset("gsm9k")


def test_limit_spreads_over_levels():
    exs = load_dataset("arith", limit=10, seed=3)
    assert sorted(ex.level for ex in exs) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert exs == load_dataset("arith", limit=10, seed=3)
