"""The fake engine follows the engine contract, so strategy logic can be tested without a model."""

from edgetts.engines import SamplingParams, create
from edgetts.models.families import FAMILIES
from edgetts.strategies.base import BudgetController, RunConfig

FAM = FAMILIES["tiny"]


def test_scripts_replay_per_row_and_finish():
    e = create("fake", scripts=[["1+1=2\n", "</think>", "\nThe answer is 2"], ["x"] * 10])
    res = e.sample("q", 2, SamplingParams(max_tokens=5))
    assert res.texts[0] == "1+1=2\n</think>\nThe answer is 2" and res.rows[0].finish_reason == "stop"
    assert res.rows[1].n_generated == 5 and res.rows[1].finish_reason == "length"


def test_budget_controller_forces_answer_at_budget():
    e = create("fake", scripts=[["a"] * 20, ["b", "</think>", "\nThe answer is 3"]], after_force=["4"])
    cut = BudgetController(e, FAM, RunConfig(n=2, budget=6), 0.0, None)
    res = e.sample("q", 2, SamplingParams(max_tokens=50), controller=cut)
    long, short = res.rows
    assert long.text == "a" * 6 + FAM.think_end + FAM.answer_prefix + "4"
    assert long.n_generated == 7 and sum(long.forced) == 1
    assert short.text == "b</think>\nThe answer is 3" and not any(short.forced)


def test_force_grants_extra_tokens_after_the_budget():
    e = create("fake", scripts=[["t"] * 10], after_force=["5", "0", "!"])

    def cut(ctl, stepped):
        r = ctl.rows[0]
        if r.n_generated == 3 and not any(r.forced):
            ctl.force(0, "|", extra_tokens=2)

    res = e.sample("q", 1, SamplingParams(max_tokens=3), controller=cut)
    assert res.texts[0] == "ttt|50" and res.rows[0].finish_reason == "length"


def test_prompts_use_the_models_chat_template_unless_raw():
    from edgetts.models.families import build_prompt

    template = (
        "{% for m in messages %}<|user|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|bot|><think>\n{% endif %}"
    )
    r1 = FAMILIES["deepseek-r1"]
    assert build_prompt(r1, "2+2?", template) == "<|user|>2+2?<|bot|><think>\n"
    assert build_prompt(r1, "2+2?", template, raw=True) == "2+2?"
    assert build_prompt(r1, "2+2?", None) == "2+2?"
    assert build_prompt(FAM, "2+2?", template) == "2+2?\n<think>"  # the tiny model has no chat format
