"""Continuous batching on the real engine: rows equal alone or beside others, failures stay inside
their request, queued requests that expired are dropped, the cache plan is enforced."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgetts.engines import EngineError, SamplingParams, open_engine
from edgetts.engines.batching import BatchedEngine
from edgetts.strategies import RunConfig, create
from edgetts.strategies.base import BudgetController
from edgetts.tasks.datasets import load_dataset


@pytest.fixture(scope="module")
def engines():
    plain, family = open_engine({"artifact": "tiny", "options": {"threads": 1}}, max_rows=16, max_tokens=160)
    split = {"threads": 1, "kv_unified": False}  # as the server opens it: a cache stream per row
    batched_inner, _ = open_engine({"artifact": "tiny", "options": split}, max_rows=16, max_tokens=160)
    batched = BatchedEngine(batched_inner)
    yield plain, batched, family
    plain.close()
    batched.close()


def _run(engine, family, strategy, question, seed, n=4):
    cfg = RunConfig(n=n, budget=96, sampling=SamplingParams(seed=seed))
    return create(strategy, engine, family, cfg).run(question)


def test_rows_are_the_same_alone_or_beside_other_requests(engines):
    plain, batched, family = engines
    problems = load_dataset("arith", limit=30, seed=0)
    work = [(s, ex.question, i) for i, ex in enumerate(problems) for s in ("majority", "esc")]
    alone = [_run(plain, family, s, q, i) for s, q, i in work]
    with ThreadPoolExecutor(8) as pool:  # up to 8 requests of 4 rows in one batch of 16 rows
        together = list(pool.map(lambda w: _run(batched, family, *w), work))
    pairs = [(a.text, b.text) for x, y in zip(alone, together) for a, b in zip(x.rows, y.rows)]
    same = sum(a == b for a, b in pairs)
    # A different batch around a row may flip a sampled token at a near-tie of probabilities only.
    assert same >= 0.95 * len(pairs), f"{same} of {len(pairs)} rows identical"
    assert sum(x.answer == y.answer for x, y in zip(alone, together)) >= 0.95 * len(work)
    assert all(len(x.rows) == len(y.rows) for x, y in zip(alone, together))


def test_a_failing_controller_fails_only_its_own_request(engines):
    _, batched, family = engines

    def broken(ctl, stepped):
        raise RuntimeError("controller bug")

    prompt = family.prompt_template.format(question="Evaluate left to right: 12+7*3")
    bad = batched.scheduler.submit(prompt, 2, SamplingParams(max_tokens=40), broken)
    good = batched.scheduler.submit(prompt, 2, SamplingParams(max_tokens=40, seed=1))
    with pytest.raises(RuntimeError, match="controller bug"):
        bad.result(timeout=60)
    assert all(r.text for r in good.result(timeout=60).rows)
    assert batched.scheduler.load() == (0, 0)  # everything released
    assert _run(batched, family, "majority", "Evaluate left to right: 12+7*3", 0).answer == "57"


def test_an_expired_request_is_dropped_while_queued(engines):
    _, batched, family = engines
    cfg = RunConfig(n=4, budget=64, deadline_ms=1.0)
    started = time.perf_counter() - 1.0  # its deadline passed while it waited
    ctl = BudgetController(batched, family, cfg, started, 0.001)
    prompt = family.prompt_template.format(question="Evaluate left to right: 12+7*3")
    res = batched.scheduler.submit(prompt, 4, SamplingParams(max_tokens=64), ctl).result(timeout=60)
    assert [r.finish_reason for r in res.rows] == ["deadline"] * 4 and not any(r.tokens for r in res.rows)
    cancel = threading.Event()
    cancel.set()
    ctl = BudgetController(batched, family, RunConfig(n=2, cancel=cancel), time.perf_counter(), None)
    res = batched.scheduler.submit(prompt, 2, SamplingParams(max_tokens=64), ctl).result(timeout=60)
    assert [r.finish_reason for r in res.rows] == ["cancelled"] * 2


def test_requests_beyond_the_plan_are_refused_not_crashed(engines):
    _, batched, family = engines
    prompt = family.prompt_template.format(question="Evaluate left to right: 12+7*3")
    with pytest.raises(EngineError, match="between 1 and 16"):
        batched.sample(prompt, 17, SamplingParams(max_tokens=8))
    with pytest.raises(EngineError, match=r"cache cells|exceeds the context"):
        batched.sample(prompt, 16, SamplingParams(max_tokens=10_000))
    with pytest.raises(EngineError, match=r"branch|probes"):
        batched.sample(prompt, 1, SamplingParams(max_tokens=8), lambda ctl, s: ctl.probe(0, "x", 2, "p"))
    assert batched.sample(prompt, 2, SamplingParams(max_tokens=8)).rows[0].n_generated > 0


def test_rounds_go_earliest_deadline_first_and_skipped_rows_resume_unchanged(engines):
    """Force the tightest pace (a second job in a round would be far too slow): each round decodes
    only the earliest-due job, so the last submitted finishes first; rows left out of rounds must
    come out exactly as they do alone."""
    plain, batched, family = engines
    sched = batched.scheduler
    prompts = [family.prompt_template.format(question=ex.question) for ex in load_dataset("arith", limit=4, seed=3)]
    params = SamplingParams(max_tokens=48, seed=5)
    now = time.perf_counter()
    dues = [40.0, 35.0, 30.0, 25.0]  # later submissions are due sooner

    def controller(engine, i):
        return BudgetController(engine, family, RunConfig(n=3, budget=40), now, dues[i])

    # A round of one job's 3 rows is free, any more costs beyond every pace (about 48 steps in 25-40 s)
    # while no end is within the last rounds of a job (an instance attribute: the fitted model is not
    # consulted).
    sched.step_cost = lambda tokens: 0.0 if tokens <= 3 else 1.0
    try:
        finished, futures = [], []
        with sched.cond:  # all four are queued before the scheduler looks
            for i, p in enumerate(prompts):
                fut = sched.submit(p, 3, params, controller(batched, i))
                fut.add_done_callback(lambda _, i=i: finished.append(i))
                futures.append(fut)
        shared = [f.result(timeout=120) for f in futures]
    finally:
        del sched.step_cost
    assert finished == [3, 2, 1, 0]
    alone = [plain.sample(p, 3, params, controller(plain, i)) for i, p in enumerate(prompts)]
    pairs = [(a.text, b.text) for x, y in zip(alone, shared) for a, b in zip(x.rows, y.rows)]
    assert sum(a == b for a, b in pairs) >= len(pairs) - 1, pairs  # one near-tie flip at most


def test_a_round_admits_later_deadlines_only_while_the_earliest_keep_their_pace():
    from types import SimpleNamespace

    from edgetts.engines.batching import Scheduler, _Entry

    now = 100.0

    def entry(tokens, due, steps):
        job = SimpleNamespace(live=True, done=False, pending_tokens=lambda: tokens, remaining_steps=lambda: steps)
        return _Entry(job, 0, None, due)

    urgent = entry(1, now + 0.020, 10)  # 2 ms a step is all it can afford
    wide, wider, small = entry(8, now + 10, 50), entry(8, now + 9, 50), entry(1, now + 11, 50)
    sched = Scheduler.__new__(Scheduler)
    sched.running, sched.prefill_chunk = [small, wide, urgent, wider], 64
    sched.speed = SimpleNamespace(stall_s=lambda: 0.0)  # no stall seen lately
    sched.step_cost = lambda tokens: 0.0005 + 0.0001 * tokens
    chosen = [e for e, _ in sched._compose(now)]
    # urgent first; `wider` (due before `wide`) fits at 1.4 ms; `wide` would make 2.2 ms; `small` fits
    assert chosen == [urgent, wider, small]
    sched.step_cost = lambda tokens: 0.0
    assert [e for e, _ in sched._compose(now)] == [urgent, wider, wide, small]  # free steps: everyone
    # A job whose end is within its answer's rounds is in the round whatever the others' pace (left out, it
    # would end with nothing said), and does not slow the pace for the jobs after it.
    sched.step_cost = lambda tokens: 0.0005 + 0.0002 * tokens  # with urgent: 2.3 ms, beyond its pace
    closing = entry(8, now + 0.0205, 40)  # due just after urgent, within its last rounds
    sched.running = [small, wide, urgent, closing]
    assert [e for e, _ in sched._compose(now)] == [urgent, closing]  # the others: beyond urgent's pace
    sched.running = [urgent, entry(8, now + 1, 40)]  # not closing yet: it waits while the urgent one runs
    assert [e for e, _ in sched._compose(now)] == [urgent]
    # After stalls of 10 ms, controllers force their answers 10 ms earlier, and a job's last rounds begin
    # 10 ms earlier too: due in 40 ms, beyond its last rounds' 15 x 2.3 ms alone, within them with the stall.
    later = entry(8, now + 0.040, 40)
    sched.running = [urgent, later]
    assert [e for e, _ in sched._compose(now)] == [urgent]
    sched.speed = SimpleNamespace(stall_s=lambda: 0.010)
    assert [e for e, _ in sched._compose(now)] == [urgent, later]


def test_the_online_step_cost_recovers_a_known_line_and_stays_non_negative():
    import random

    from edgetts.engines.speed import StepCost

    cost, rng = StepCost(), random.Random(0)
    for _ in range(2000):
        x = rng.choice([1, 3, 8, 16, 40])
        cost.add(x, 0.00012 + 0.000075 * x + rng.gauss(0, 0.00002))
    a, b = cost.fit()
    assert a == pytest.approx(0.00012, rel=0.1) and b == pytest.approx(0.000075, rel=0.05)
    for _ in range(3000):  # the machine slows down: the old rounds fade
        x = rng.choice([1, 8, 40])
        cost.add(x, 2 * (0.00012 + 0.000075 * x))
    assert cost.fit()[1] == pytest.approx(0.00015, rel=0.05)
    falling = StepCost()
    falling.add(1, 0.002)
    falling.add(10, 0.001)  # more tokens, less time: noise, not a negative slope
    assert falling.fit() == (pytest.approx(0.0015, rel=0.01), 0.0)  # their weighted mean, flat
    assert StepCost().fit() == (0.0, 0.0)


def test_a_round_mixes_two_requests_and_a_cancel_stops_one_mid_decode(engines):
    """From the scheduler's own trace: two concurrent requests' rows share decodes; a request cancelled
    while its rows decode stops (its tokens stop growing) and the other goes on to its answer."""
    import threading

    _, batched, family = engines
    trace = batched.scheduler.trace_rounds()
    jobs = {}
    real_submit = batched.scheduler.submit

    def remember(prompt, n, params, controller=None, seeds=None):
        future = real_submit(prompt, n, params, controller, seeds)
        jobs[id(controller)] = next(e.job for e in list(batched.scheduler.queue) + batched.scheduler.running
                                    if e.future is future)  # fmt: skip
        return future

    batched.scheduler.submit = remember
    cancel = threading.Event()
    try:
        long_cfg = RunConfig(n=8, budget=128, cancel=cancel, sampling=SamplingParams(seed=3))
        other_cfg = RunConfig(n=4, budget=64, sampling=SamplingParams(seed=4))
        with ThreadPoolExecutor(2) as pool:
            doomed = pool.submit(create("majority", batched, family, long_cfg).run, "Evaluate left to right: 47+38*3")
            other = pool.submit(create("majority", batched, family, other_cfg).run, "Evaluate left to right: 8*4-3")

            def decoded(n=8):  # a request's tokens so far (by its rows: 8 the cancelled one, 4 the other)
                return sum(r.n_generated for j in list(jobs.values()) if j.n == n for r in j.rows)

            # Both decoding before the cancel: on a busy machine one thread may start a round or more late.
            deadline = time.time() + 30
            while time.time() < deadline and (decoded() < 40 or decoded(4) == 0):
                time.sleep(0.001)
            cancel.set()
            at_cancel = decoded()
            stopped, answered = doomed.result(timeout=60), other.result(timeout=60)
    finally:
        batched.scheduler.submit = real_submit
        batched.scheduler.trace = None
    both = {id(j) for j in jobs.values()}
    assert len(both) == 2 and any(both <= set(r) for r in trace)  # one decode held rows of both requests
    # its tokens stopped growing within a round or two of the cancel, far short of its budget
    assert at_cancel >= 40 and stopped.generated_tokens <= at_cancel + 2 * 8 < 8 * 128
    assert any(r.finish_reason == "cancelled" for r in stopped.rows)
    assert answered.answer is not None and answered.early_stop != "cancelled"


def test_a_calls_first_steps_are_priced_like_recent_rounds_not_its_own_prefill(engines, monkeypatch):
    """The batch hands each call's controller the cost of a round as a prior for its first steps: a round
    like the recent ones, not the call's own prompt prefill just before (dozens of tokens), which priced
    every step of a tight request as a prefill and forced its answer at once, with nothing thought."""
    _, batched, family = engines
    sched = batched.scheduler
    monkeypatch.setattr(sched.cost, "fit", lambda: (1e-4, 1e-4))  # a known line: what matters is the tokens
    _run(batched, family, "single", "Evaluate left to right: 2+2", 0, n=1)  # recent rounds: one row decoding
    priors = []

    def first(ctl, stepped):
        priors.append(ctl.step_s)
        ctl.stop_all("length")

    prompt = family.prompt_template.format(question="Evaluate left to right: 12+7*3+60*3-47")
    sched.submit(prompt, 1, SamplingParams(max_tokens=40), first).result(timeout=60)
    prompt_tokens = len(batched.tokenize(prompt))
    assert prompt_tokens > 20 and priors
    assert priors[0] < sched.step_cost(prompt_tokens) / 3  # near a round of a few tokens, not of the prompt
    # On a real call with a deadline well beyond its thinking, the answer is not forced at its first step.
    cfg = RunConfig(n=1, budget=64, deadline_ms=30_000, sampling=SamplingParams(seed=0))
    trace = create("single", batched, family, cfg).run("Evaluate left to right: 12+7*3")
    assert trace.rows[0].thinking_tokens > 4 and not trace.rows[0].forced_answer
