"""Strategy logic on the scripted fake engine: exact control, no model."""

import dataclasses

import pytest

from edgetts.engines import EngineError, SamplingParams, create
from edgetts.models.families import FAMILIES
from edgetts.strategies import STRATEGIES, RunConfig, StrategyError
from edgetts.strategies import create as strategy

FAM = FAMILIES["tiny"]


def answer_script(answer, think=3):
    return ["x"] * think + ["\n", FAM.think_end, f"{FAM.answer_prefix}{answer}"]


def fake(*answers, think=3, **kw):
    return create("fake", scripts=[answer_script(a, think) for a in answers], **kw)


def test_names_are_the_documented_ones():
    assert list(STRATEGIES) == ["single", "budget-forcing", "length-hint", "majority", "weighted",
                                "best-of-n", "first-finish", "adaptive", "esc"]  # fmt: skip
    with pytest.raises(StrategyError, match="choose one of: single"):
        strategy("beam", fake("1"), FAM, RunConfig())


def test_budget_forcing_stops_exactly_at_its_budget():
    e = fake("9", think=50, after_force=["4"])
    t = strategy("single", e, FAM, RunConfig(budget=7)).run("q")
    row = t.rows[0]
    assert row.thinking_tokens == 7 and row.forced_answer and t.answer == "4"


def test_budget_forcing_extends_with_wait():
    e = create("fake", scripts=[["a", FAM.think_end, "b", "c", FAM.think_end, FAM.answer_prefix + "5"]])
    t = strategy("budget-forcing", e, FAM, RunConfig(budget=50), max_waits=1).run("q")
    row = t.rows[0]
    assert row.waits == 1 and t.answer == "5"
    assert row.text.startswith("aWaitbc" + FAM.think_end)
    assert row.thinking_tokens == 3  # a, b, c: the replaced delimiter does not count


def test_length_hint_changes_the_prompt():
    seen = []
    e = create("fake", scripts=lambda prompt, i, seed: seen.append(prompt) or answer_script("1"))
    strategy("length-hint", e, FAM, RunConfig(budget=64)).run("What is 1?")
    assert "Limit your reasoning to 64 tokens." in seen[0]


def test_majority_votes_and_drops_invalid():
    e = create("fake", scripts=[answer_script("3"), answer_script("4"), ["no answer"], answer_script("4")])
    t = strategy("majority", e, FAM, RunConfig(n=4)).run("q")
    assert t.answer == "4" and t.votes == {"3": 1.0, "4": 2.0} and t.rows_used == 4


def test_weighted_vote_follows_confidence():
    conf = {0: -0.01, 1: -3.0, 2: -3.0}  # row 0 is sure, rows 1-2 are not
    e = fake("8", "9", "9", logprob=lambda row, step: conf[row.seed])
    t = strategy("weighted", e, FAM, RunConfig(n=3), confidence="mean").run("q")
    assert t.answer == "8"
    assert t.rows[0].confidence == pytest.approx(-0.01)


def test_weighted_online_stops_low_confidence_rows():
    conf = {0: -0.1, 1: -0.1, 2: -5.0, 3: -0.1}
    e = fake("8", "8", "9", "8", think=40, logprob=lambda row, step: conf[row.seed])
    t = strategy("weighted", e, FAM, RunConfig(n=4), online=True, warmup=2, window=4, keep=0.5).run("q")
    assert t.rows[2].finish_reason == "low-confidence" and t.rows[2].answer is None
    assert t.early_stop == "low-confidence" and t.answer == "8"


def test_best_of_n_picks_the_most_likely_answer():
    lp = {0: -2.0, 1: -0.1, 2: -2.0}
    e = fake("5", "6", "5", logprob=lambda row, step: lp[row.seed])
    assert strategy("best-of-n", e, FAM, RunConfig(n=3)).run("q").answer == "6"
    # Weighted best-of-n sums exp(score): two rows at exp(-2) = 0.27 do not beat exp(-0.1) = 0.9.
    assert strategy("best-of-n", e, FAM, RunConfig(n=3), weighted=True).run("q").answer == "6"


def test_first_finish_returns_the_first_finished_row():
    e = create("fake", scripts=[answer_script("1", think=9), answer_script("2", think=2), answer_script("3", think=5)])
    t = strategy("first-finish", e, FAM, RunConfig(n=3)).run("q")
    assert t.answer == "2" and t.early_stop == "first-finish"
    assert t.rows[0].finish_reason == "first-finish" and t.rows[1].finish_reason == "stop"
    assert t.generated_tokens < 3 * (9 + 3)


def test_adaptive_stops_early_when_rows_agree_and_not_when_they_disagree():
    agree = strategy("adaptive", fake("7"), FAM, RunConfig(n=8)).run("q")
    assert agree.rows_used == 4 and agree.early_stop == "adaptive" and agree.answer == "7"
    split = strategy("adaptive", fake("7", "8"), FAM, RunConfig(n=8)).run("q")
    assert split.rows_used == 8 and split.early_stop is None


def test_esc_stops_after_a_unanimous_window():
    agree = strategy("esc", fake("7"), FAM, RunConfig(n=8), window=4).run("q")
    assert agree.rows_used == 4 and agree.early_stop == "esc"
    split = strategy("esc", fake("7", "8"), FAM, RunConfig(n=8), window=4).run("q")
    assert split.rows_used == 8 and split.early_stop is None


def test_deadline_forces_answers_then_stops():
    e = fake("1", think=10_000, after_force=["3"], step_seconds=0.002)
    t = strategy("majority", e, FAM, RunConfig(n=2, budget=10_000, deadline_ms=60)).run("q")
    assert t.deadline_met and t.answer == "3"
    assert all(r.forced_answer for r in t.rows)


@pytest.fixture
def clock(monkeypatch):
    """Time that moves only when the fake engine sleeps (its steps and stalls): exact, on any machine."""
    import time

    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


@pytest.mark.parametrize("grace_ms", [0.0, 30.0])
def test_a_stall_past_the_deadline_leaves_the_grace_to_state_the_answer(clock, grace_ms):
    """A row reasoning at 1 ms a step meets a 40 ms wait for the CPU 30 ms before its deadline (60 ms),
    before its answer was due: at the deadline it is still reasoning.  Without a grace it is cut with no
    answer; with one (a server's share of its reserve) it is given the answer prefix and states it."""
    e = fake("1", think=10_000, after_force=["3"], step_seconds=0.001, stalls={30: 0.04})
    t = strategy("single", e, FAM, RunConfig(budget=10_000, deadline_ms=60, grace_ms=grace_ms)).run("q")
    assert t.early_stop == "deadline" or grace_ms
    if grace_ms:
        assert t.answer == "3" and t.rows[0].forced_answer and t.wall_s <= (60 + grace_ms) / 1000
    else:
        assert t.answer is None and not t.rows[0].forced_answer


@pytest.mark.parametrize("rescue_ms", [0.0, 50.0])
def test_a_call_that_would_come_back_empty_may_state_its_answer_in_the_rescue(clock, rescue_ms):
    """The same row meets its 40 ms wait 20 ms before the deadline, so it is 20 ms past it when the wait
    ends: beyond a 5 ms grace, cut with no answer at all; a server's rescue (the rest of its reserve, for a
    call that would otherwise come back empty) lets it state one.  A call one of whose rows has finished
    has its answer already: its reasoning rows get the grace only."""
    e = fake("1", think=10_000, after_force=["3"], step_seconds=0.001, stalls={40: 0.04})
    cfg = RunConfig(budget=10_000, deadline_ms=60, grace_ms=5, rescue_ms=rescue_ms)
    t = strategy("single", e, FAM, cfg).run("q")
    if rescue_ms:
        assert t.answer == "3" and t.rows[0].forced_answer and t.wall_s <= (60 + rescue_ms) / 1000
    else:
        assert t.answer is None and t.early_stop == "deadline" and not t.rows[0].forced_answer
    quick = create("fake", scripts=[answer_script("7", 3), answer_script("1", 10_000)], after_force=["3"],
                   step_seconds=0.001, stalls={40: 0.04})  # fmt: skip
    t = strategy("majority", quick, FAM, dataclasses.replace(cfg, n=2)).run("q")
    assert t.answer == "7" and t.rows[1].finish_reason == "deadline" and not t.rows[1].forced_answer
    # A server's: the reserve but the outside time a client typically meets and the response's ms.
    from edgetts.timing import RESCUE_KEEP_MS, RESERVE_MS, RESERVE_SHARE, Deadline

    assert Deadline(0.0, 31.6).rescue_ms == pytest.approx(RESERVE_MS + RESERVE_SHARE * 31.6 - RESCUE_KEEP_MS)
    assert Deadline(0.0, 31.6).rescue_ms > Deadline(0.0, 31.6).grace_ms
    # nor a later round of a strategy (ESC, adaptive): its first round's rows finished; each run starts anew
    s = strategy("single", fake("1"), FAM, RunConfig())
    for question in ("q", "q2"):
        prompt = s.prompt(question)
        firsts = [s.sample(prompt, 1, 0.0, [k])[1].earlier_rounds for k in range(3)]
        assert firsts == [False, True, True]


@pytest.mark.parametrize("round_s", [None, 0.001])
def test_a_job_left_out_of_a_shared_batch_s_rounds_still_has_its_answer_forced(clock, round_s):
    """A 40 ms gap 10 ms before the end: on an engine running one call it is the call's own step (a device
    that slows that much may do it again): the row is cut.  In a shared batch (which says its rounds cost
    1 ms) it is rounds the job was left out of; from its last rounds on it is in every round, so its
    answer is forced by the batch's round and stated.  The gap inflated the step estimate before, and the
    job was cut at its end with nothing said."""
    e = create("fake", scripts=[answer_script("1", 10_000)], after_force=["3"], step_seconds=0.001,
               stalls={10: 0.04}, round_s=round_s)  # fmt: skip
    t = strategy("single", e, FAM, RunConfig(budget=10_000, deadline_ms=60, grace_ms=1)).run("q")
    if round_s:
        assert t.answer == "3" and t.rows[0].forced_answer and t.wall_s <= 0.061
    else:
        assert t.answer is None and t.early_stop == "deadline"


def test_capabilities_are_checked():
    class NoLogprobs(type(fake("1"))):
        logprobs = False

    with pytest.raises(StrategyError, match="logprobs"):
        strategy("weighted", NoLogprobs(scripts=[["x"]]), FAM, RunConfig(n=2))


def test_bad_options_and_values():
    with pytest.raises(StrategyError):
        RunConfig(n=0)
    with pytest.raises(StrategyError):
        RunConfig(deadline_ms=-5)
    with pytest.raises(StrategyError, match="takes no options"):
        strategy("majority", fake("1"), FAM, RunConfig(), window=3)
    with pytest.raises(StrategyError):
        strategy("adaptive", fake("1"), FAM, RunConfig(), threshold=1.5)
    with pytest.raises(EngineError, match="temperature"):
        RunConfig(sampling=SamplingParams(temperature=-0.5))


def test_messages_a_chat_template_refuses_are_the_request_s_error():
    # Many templates (Gemma's, Mistral's, Llama 2's) insist that roles alternate; a chat that breaks
    # the rule is the caller's error (a StrategyError, a 400 in serve), not the engine's failure.
    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                 "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")  # fmt: skip
    e = fake("5")
    e.chat_template = lambda: alternate
    fam = dataclasses.replace(FAM, chat=True)
    ok = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "q"})
    assert strategy("single", e, fam, RunConfig(messages=ok)).run("q").answer == "5"
    twice = ({"role": "user", "content": "a"}, {"role": "user", "content": "q"})
    with pytest.raises(StrategyError, match="chat template refuses these messages: Conversation roles must alternate"):
        strategy("single", e, fam, RunConfig(messages=twice)).run("q")
