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


def _first_call(prior_s, clock, tokens, stall_s=None):
    """A controller's first call on one thinking row 10 ms into a 40 ms deadline, the engine's step estimate
    ``prior_s`` (None: the engine has none); returns the row's queued forced text."""
    from edgetts.engines.base import Control, Row

    e = create("fake", scripts=[["a"] * 40])
    ctl_ = BudgetController(e, FAM, RunConfig(n=1, budget=100), 0.0, 0.040)
    row = Row(0, 0)
    for t in tokens:
        row.add(t, "a", False, 0.0)
    ctl = Control([row], 0.0)
    ctl.prefill_s, ctl.step_s, ctl.stall_s = 0.0001, prior_s, stall_s  # the fake engine: a character a token
    clock[0] = 0.010
    ctl_(ctl, [0])
    return ctl.pending.get(0)


def test_a_controller_starts_from_the_engines_step_estimate(monkeypatch):
    """A shared batch tells a call what its rounds cost now: 30 ms left, 3 ms a round, the answer's reserved
    steps no longer fit and the answer is forced at the first call; with no estimate (an engine alone) the
    first call has nothing to go on and the row thinks on, as before."""
    import edgetts.strategies.base as sb

    clock = [0.0]
    monkeypatch.setattr(sb.time, "perf_counter", lambda: clock[0])
    assert _first_call(0.003, clock, [5]) == FAM.think_end + FAM.answer_prefix
    assert _first_call(None, clock, [5]) is None
    assert _first_call(0.0005, clock, [5]) is None  # fast rounds: time to think on
    # ... unless the device stalls: 25 ms waits (other work has the CPU) leave no room to think on
    assert _first_call(0.0005, clock, [5], stall_s=0.025) == FAM.think_end + FAM.answer_prefix


def test_a_row_that_ends_its_thinking_late_is_given_the_answer_prefix(monkeypatch):
    """A row whose own end of thinking comes when an answer of its own (up to answer_tokens) would not fit
    before the deadline gets the answer prefix at once; with time enough it answers in its own words."""
    import edgetts.strategies.base as sb

    clock = [0.0]
    monkeypatch.setattr(sb.time, "perf_counter", lambda: clock[0])
    e = create("fake", scripts=[["a"]])
    end = e.tokenize(FAM.think_end)
    assert _first_call(0.0008, clock, [5, *end]) == FAM.answer_prefix  # 33 steps of 0.8 ms x 1.5 > 30 ms left
    assert _first_call(0.0004, clock, [5, *end]) is None  # 33 x 0.4 ms x 1.5 = 20 ms: its own answer fits
