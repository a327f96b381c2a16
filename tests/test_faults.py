"""Failures contained: faults injected into the shared batch's thread, engine failures as 503, a
thread that is gone seen at once, and the server's own answers to what a client leaves behind."""

import asyncio
import contextlib
import json
import math
import shutil
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from edgetts.engines import SamplingParams, open_engine
from edgetts.engines.base import EngineFailure
from edgetts.engines.batching import BatchedEngine
from edgetts.strategies import RunConfig, create
from edgetts.strategies.base import BudgetController

Q = "Evaluate left to right: 8*4-3"


@pytest.fixture
def batched():
    inner, family = open_engine({"artifact": "tiny", "options": {"threads": 1, "kv_unified": False}}, max_rows=8,
                                max_tokens=160)  # fmt: skip
    engine = BatchedEngine(inner)
    yield engine, family
    engine.close()


def _run(engine, family, n=2):
    return create("majority", engine, family, RunConfig(n=n, budget=32, sampling=SamplingParams(seed=1))).run(Q)


class RaisingExpiry(BudgetController):
    def expired(self, need_s: float = 0.0):
        raise RuntimeError("injected: admission fault")


class RaisingStep(BudgetController):
    def on_step(self, ctl, stepped):
        raise RuntimeError("injected: round fault")


def _submit_with(engine, family, controller):
    prompt = "Q: " + Q
    return engine.scheduler.submit(prompt, 2, SamplingParams(max_tokens=16, seed=1), controller)


@pytest.mark.parametrize("fault", [RaisingExpiry, RaisingStep])
def test_a_fault_in_the_batch_thread_fails_only_its_job(batched, fault):
    engine, family = batched
    ctl = fault(engine, family, RunConfig(n=2, budget=16), time.perf_counter(), None)
    future = _submit_with(engine, family, ctl)
    with pytest.raises(RuntimeError, match="injected"):
        future.result(timeout=30)
    assert engine.scheduler.thread.is_alive() and engine.healthy() is None  # the thread lives on
    assert _run(engine, family).answer == "29"  # and the next request is answered


def test_a_thread_that_is_gone_fails_waiters_at_once(batched, monkeypatch):
    engine, family = batched
    sched = engine.scheduler

    def broken_round():
        raise SystemExit("injected: the thread itself stops")  # not an Exception: nothing inside catches it

    monkeypatch.setattr(sched, "_round", broken_round)
    failed = []

    def waiter():
        with pytest.raises(EngineFailure, match="batch thread stopped"):
            _run(engine, family)
        failed.append(True)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    t.join(120)  # a hang guard, not a speed bound: a waiter left behind would wait for ever
    assert not t.is_alive() and failed
    sched.thread.join(5)
    assert not sched.thread.is_alive() and "batch thread gone" in engine.healthy()
    with pytest.raises(EngineFailure, match="batch thread is gone"):
        _run(engine, family)  # refused at once, never queued behind a dead thread


@pytest.fixture
def app_and_server(direct_profile, tmp_path):
    from edgetts.runtime.http import create_app

    d = tmp_path / "p"
    shutil.copytree(direct_profile, d)
    app = create_app(str(d / "pareto.json"), api_key="k", threads=1)
    yield app, app.state.server
    app.state.server.executor.close()


def _post(app, body, headers=None):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k", **(headers or {})})

    return asyncio.run(go())


def _get(app, path):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get(path)

    return asyncio.run(go())


def test_an_answer_cut_before_any_row_answered_is_never_on_time(app_and_server, monkeypatch):
    from edgetts.runtime.executor import Outcome

    app, server = app_and_server
    real = server.executor.run

    def cut(req, plan):  # the run ends on time but with no row having stated an answer
        out = real(req, plan)
        out.trace.answer = None
        for row in out.trace.rows:  # the first row's answer forced, 3 of its tokens decoded before the cut
            row.forced_answer, row.answer_tokens = row is out.trace.rows[0], 3
        return Outcome(out.trace, out.total_ms, True)

    monkeypatch.setattr(server.executor, "run", cut)
    r = _post(app, {"prompt": Q, "deadline_ms": 60000})
    info = r.json()["edgetts"]
    rows = info["rows_used"]
    assert r.status_code == 200 and info["deadline_met"] is False and "(rows ended: " in info["error"]
    assert info["error"].endswith(f"; answers forced in 1 of {rows}, 3 answer tokens decoded)"), info["error"]
    assert "edgetts_deadline_misses_total 1" in server.metrics.render()


def test_engine_failures_are_503_with_retry_after_and_healthz_says_so(app_and_server, monkeypatch):
    app, server = app_and_server

    def failing(req, plan):
        raise EngineFailure("llama_decode failed on the prompt (the cache is full)")

    monkeypatch.setattr(server.executor, "run", failing)
    r = _post(app, {"prompt": Q, "deadline_ms": 60000})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "engine_unavailable"
    monkeypatch.setattr(server.executor, "unhealthy", lambda: "batch thread gone: RuntimeError()")

    async def health():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/healthz")

    h = asyncio.run(health())
    assert h.status_code == 503 and h.json()["status"] == "unhealthy"
    r = _post(app, {"prompt": Q, "deadline_ms": 60000})
    assert r.status_code == 503 and "batch thread gone" in r.json()["error"]["message"]


def test_refused_connections_are_closed_and_a_mid_body_disconnect_is_quiet(direct_profile, tmp_path):
    from test_server import _start, _stop

    d = tmp_path / "p"
    shutil.copytree(direct_profile, d)
    proc, url = _start(d / "pareto.json", "--api-key", "k", "--read-timeout", "2")
    host, port = url.removeprefix("http://").split(":")
    try:
        socks = []
        for _ in range(50):  # no key, a body announced: 401, and then a byte more
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.settimeout(10)
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()
            with contextlib.suppress(OSError):  # the server may have closed it already
                s.sendall(b"x")
        for s in socks:  # every one closed by the server (end of stream, or a reset for the unread bytes)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):
                    pass
            s.close()
        # a client that leaves in the middle of its body: no traceback, counted as cancelled
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 1000\r\n"
                  b"Content-Type: application/json\r\n\r\n{\"prompt\": ")  # fmt: skip
        time.sleep(0.3)  # the server is reading the body by now
        s.close()
        t0 = time.monotonic()  # the disconnect is counted once the server sees it (a hang guard, not a bound)
        while 'outcome="cancelled"} 1' not in httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).text:
            assert time.monotonic() - t0 < 30, "the mid-body disconnect was never counted as cancelled"
            time.sleep(0.05)
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
    finally:
        log = _stop(proc)
    assert "edgetts serve" in log and "Traceback" not in log


def test_device_speed_follows_the_rounds_and_fades_with_time(monkeypatch):
    from edgetts.engines import speed as device_speed

    clock = [100.0]
    monkeypatch.setattr(device_speed.time, "perf_counter", lambda: clock[0])
    speed = device_speed.DeviceSpeed()
    fit = (0.001, 0.0001)  # a round of 10 tokens: 2 ms as serving began

    def rounds(k, seconds, dt=0.002):
        for _ in range(k):
            clock[0] += dt
            speed.add(10, seconds, fit)

    rounds(speed.WARM, 0.002)
    assert speed.slowdown() == 1.0  # the reference: the device as the server found it
    rounds(2000, 0.003)  # 4 s of rounds 1.5 times slower (other work took a core)
    assert 1.45 < speed.slowdown() < 1.55
    clock[0] += 30  # nothing measured for 30 s: the slowdown fades with time, not with refusals
    assert speed.slowdown() < 1.01
    rounds(2000, 0.002)
    assert speed.slowdown() < 1.05


def test_stalls_beside_other_work_are_kept_for_admission(monkeypatch):
    """A device whose cores other work shares runs most rounds at speed and some after a wait for the CPU:
    the wait is what a short request must expect to meet, and admission adds it to every prediction."""
    from edgetts.engines import speed as device_speed

    clock = [100.0]
    monkeypatch.setattr(device_speed.time, "perf_counter", lambda: clock[0])
    speed = device_speed.DeviceSpeed()
    fit = (0.001, 0.0001)  # a round of 10 tokens: 2 ms

    def rounds(k, seconds, every=0, stall=0.0):
        for i in range(k):
            clock[0] += 0.002
            speed.add(10, seconds + (stall if every and i % every == 0 else 0.0), fit)

    rounds(speed.WARM + 400, 0.002)
    assert speed.stall_s() < 0.0005  # a quiet device: no stall to expect
    rounds(2000, 0.002, every=8, stall=0.008)  # one round in eight waits 8 ms for the CPU
    assert 0.004 < speed.stall_s() < 0.009 and speed.slowdown() > 1.2
    clock[0] += 60  # nothing measured for a minute: forgotten
    assert speed.stall_s() < 0.0001


def test_a_row_past_its_usual_length_does_not_take_the_whole_batch():
    """Past the expected length a row is expected to end soon, not to run to its limit: its pace
    stays near a step and the earliest-due job does not run alone while the others wait."""
    from types import SimpleNamespace

    from edgetts.engines.llamacpp_job import OVERRUN_STEPS, Job

    def job(expected, generated, limit=160):
        rows = [SimpleNamespace(finished=False, n_generated=g, index=i) for i, g in enumerate(generated)]
        return SimpleNamespace(expected_tokens=expected, rows=rows, limit=[limit] * len(rows))

    assert Job.remaining_steps(job(40, [10, 30])) == 30
    assert Job.remaining_steps(job(40, [45])) == 11  # a quarter of the usual length, not 115
    assert Job.remaining_steps(job(400, [401], limit=1000)) == OVERRUN_STEPS
    assert Job.remaining_steps(job(40, [158])) == 2  # never past its limit
    assert Job.remaining_steps(job(None, [20])) == 140  # nothing known: the limit


def test_a_budget_no_point_has_gets_an_expectation_from_the_nearest():
    from edgetts.runtime.executor import Executor
    from edgetts.runtime.planning import Plan

    points = [{"budget": 32, "n": 1, "tokens": 30.0}, {"budget": 128, "n": 8, "tokens": 8 * 60.0}]
    ex = Executor.__new__(Executor)
    ex.policy = SimpleNamespace(frontier=points)

    def expected(budget):
        return ex.expected_tokens(Plan(None, "single", 1, budget))

    assert expected(128) == 60.0 and expected(32) == 30.0
    assert expected(100) == 60.0 * 100 / 128  # an OpenAI client's max_tokens: 100
    assert expected(1000) == 60.0  # a longer budget does not make rows longer


def test_the_servers_clock_starts_at_the_first_byte_and_stops_at_the_last(direct_profile, tmp_path):
    """A request whose headers trickle in for longer than its deadline is late from its first byte:
    refused, not answered as if it had just arrived; every response is timed to its last byte."""
    from test_server import _start, _stop

    d = tmp_path / "p"
    shutil.copytree(direct_profile, d)
    proc, url = _start(d / "pareto.json")
    host, port = url.removeprefix("http://").split(":")
    try:
        body = b'{"prompt": "Evaluate left to right: 8*4-3", "deadline_ms": 150}'
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.4)  # longer than the deadline, before the headers are complete
        s.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        s.settimeout(30)
        head = s.recv(65536)
        s.close()
        assert head.startswith(b"HTTP/1.1 429"), head[:200]  # from the headers it would have had 150 ms
        ok = httpx.post(url + "/v1/completions", json={"prompt": Q, "deadline_ms": 60000}, timeout=30)
        assert ok.status_code == 200
        metrics = httpx.get(url + "/metrics").text
        count = next(line for line in metrics.splitlines() if line.startswith("edgetts_response_seconds_count"))
        assert int(count.split()[1]) >= 2
    finally:
        _stop(proc)


def test_serve_holds_a_mean_budget_with_its_price(direct_profile, tmp_path):
    from edgetts.runtime.http import create_app

    d = tmp_path / "p"
    shutil.copytree(direct_profile, d)
    cfg = json.loads((d / "pareto.json").read_text())
    [point] = cfg["frontier"]  # a dearer, more accurate twin: a price has a choice to make
    cfg["frontier"].append(dict(point, id=point["id"] + "-twin", latency_ms=2 * point["latency_ms"],
                                accuracy=min(1.0, point["accuracy"] + 0.1)))  # fmt: skip
    (d / "pareto.json").write_text(json.dumps(cfg))
    app = create_app(str(d / "pareto.json"), threads=1, mean_ms=0.01)  # far below any answer's time
    try:
        prices = []
        for _ in range(3):
            r = _post(app, {"prompt": Q, "deadline_ms": 60000}, headers={"Authorization": ""})
            assert r.status_code == 200
            prices.append(r.json()["edgetts"]["price"])
        # the price in force rises after answers over the budget, and /metrics shows it
        assert prices[0] == 0.0 and 0 < prices[1] < prices[2]
        assert f"edgetts_price {app.state.server.price}" in app.state.server.metrics.render()
    finally:
        app.state.server.executor.close()


def test_a_load_price_follows_the_engine_time_asked_for_lately_and_falls_to_zero_when_idle():
    from edgetts.runtime.pricing import LoadPrice

    now = [0.0]
    lp = LoadPrice(clock=lambda: now[0])
    assert lp.load() == 0.0 and lp.price(1.0) == 0.0  # idle: the most accurate point that fits
    # A steady 500 engine-ms asked per second (a request holding 5 ms every 10 ms): half the engine's time.
    for _ in range(int(20 * lp.TAU_S / 0.01)):
        now[0] += 0.01
        lp.admitted(5.0)
    assert lp.load() == pytest.approx(0.5, rel=0.02)
    ramp = (lp.load() - lp.FREE) / (lp.FULL - lp.FREE)
    assert 0 < ramp < 1 and lp.price(1.0) == pytest.approx(lp.SHARE * ramp)
    for _ in range(int(20 * lp.TAU_S / 0.01)):  # twice that: more than the ramp's top, and bounded there
        now[0] += 0.01
        lp.admitted(10.0)
    assert lp.load() == pytest.approx(1.0, rel=0.02) and lp.price(2.0) == pytest.approx(lp.SHARE * 2.0)
    now[0] += lp.TAU_S  # a short lull lowers it (by e), it does not reset it
    assert 0 < lp.price(1.0) < lp.SHARE
    now[0] += 10 * lp.TAU_S  # a few time constants of idleness: back to 0
    assert lp.load() < 0.01 and lp.price(1.0) == 0.0
    lp.admitted(math.nan)  # nothing measurable moves nothing
    lp.admitted(-5.0)
    assert lp.load() < 0.01


def test_serve_with_a_load_price_prices_engine_time_when_busy_and_not_when_idle(three_points, monkeypatch):
    from edgetts.runtime.http import create_app

    app = create_app(str(three_points[1]), threads=1, load_price=True)
    server = app.state.server
    try:
        # The efficient price: the most accuracy per engine-ms of the frontier (10 ms at 40%).
        work = {p["id"]: server.executor.work_ms(p) for p in server.policy.frontier}
        assert server.efficient_price() == pytest.approx(
            max(acc / work[f"p{ms}"] for ms, acc in ((10, 0.4), (20, 0.6), (40, 0.7))))
        r = _post(app, {"prompt": Q, "deadline_ms": 100}, headers={"Authorization": ""})
        assert r.status_code == 200 and r.json()["edgetts"]["price"] == 0.0  # the first request: idle
        assert server.load_price.load() > 0  # it counted the engine time that request held
        top = server.load_price.SHARE * server.efficient_price()  # at the step cost that request measured
        load = {"share": 10.0}  # ten times the engine's time asked for lately
        monkeypatch.setattr(server.load_price, "load", lambda: load["share"])
        r = _post(app, {"prompt": Q, "deadline_ms": 100}, headers={"Authorization": ""})
        assert r.status_code == 200 and r.json()["edgetts"]["price"] == pytest.approx(top, rel=0.05)
        # 20 ms more for 10 points of accuracy is not worth it under load: the 20 ms point, not a refusal
        assert r.json()["edgetts"]["point_id"] == "p20"
        metrics = dict(line.split() for line in _get(app, "/metrics").text.splitlines() if line[0] != "#")
        # the price at the ceiling, at the step cost the batch measures now
        assert float(metrics["edgetts_price"]) == pytest.approx(server.load_price.SHARE * server.efficient_price())
        assert float(metrics["edgetts_engine_load"]) == 10.0
        load["share"] = 0.0  # the server went idle: /metrics says the price now, before any request comes
        metrics = _get(app, "/metrics").text
        assert "edgetts_price 0.0\n" in metrics and "edgetts_engine_load 0.0\n" in metrics
        r = _post(app, {"prompt": Q, "deadline_ms": 100}, headers={"Authorization": ""})
        assert r.json()["edgetts"]["price"] == 0.0 and r.json()["edgetts"]["point_id"] == "p40"  # idle: accurate
    finally:
        server.executor.close()


def test_a_serial_engine_counts_what_each_request_held_not_its_wait():
    """Under load a serial engine's requests wait their turn; what their calls held the engine is what they
    took alone, so the policy can recalibrate from every request and not only from lone ones."""
    import threading

    from edgetts.engines import create
    from edgetts.runtime.executor import SerialEngine

    class Slow:
        name, parallel_rows, forced_tokens, logprobs, steppable, probes = "slow", True, True, False, True, False

        def sample(self, *args, **kwargs):
            time.sleep(0.05)
            return create("fake", scripts=[["x"]]).sample("q", 1, SamplingParams(max_tokens=1))

    serial = SerialEngine(Slow())
    ready, out = threading.Event(), {}

    def request():
        serial.take_held_s()
        t0 = time.perf_counter()
        ready.set()
        serial.sample("q", 1, SamplingParams(max_tokens=1))
        out["waited"], out["held"] = time.perf_counter() - t0, serial.take_held_s()

    with serial.lock:  # another request's turn: this one waits at least 0.1 s
        worker = threading.Thread(target=request)
        worker.start()
        assert ready.wait(30)
        time.sleep(0.1)
    worker.join(30)
    assert out["held"] >= 0.05  # its own call
    assert out["held"] <= out["waited"] - 0.1  # the wait for its turn left out
    assert serial.take_held_s() == 0.0  # another thread's count: nothing held here


def test_an_engine_alone_measures_its_stalls_for_the_next_calls(monkeypatch):
    """On an engine that runs one call at a time (the sequential server), the steps of every call are timed:
    a wait for the CPU seen in earlier calls is the stall the next call's controller keeps room for."""
    from types import SimpleNamespace

    from edgetts.engines import stalls as stalls_module

    clock = [100.0]
    monkeypatch.setattr(stalls_module.time, "perf_counter", lambda: clock[0])
    meter, seen = stalls_module.Stalls(), []

    def call(steps, stall_every=0):
        ctl = SimpleNamespace(stall_s=None)
        timed = stalls_module.Timed(lambda c, stepped: seen.append(c.stall_s), meter)
        for i in range(steps):
            clock[0] += 0.0005 + (0.008 if stall_every and i % stall_every == stall_every - 1 else 0.0)
            timed(ctl, [0])

    call(100)
    assert seen[-1] < 0.0005  # steps at an even pace: no stall to expect
    call(200, stall_every=10)  # other work took the CPU for 8 ms one step in ten
    seen.clear()
    call(1)
    assert 0.004 < seen[0] < 0.009  # the next call starts knowing it
    clock[0] += 60
    call(1)
    assert seen[-1] < 1e-4  # a minute with nothing measured: forgotten


def test_a_serial_engine_drops_a_call_that_could_no_longer_state_an_answer(monkeypatch):
    """A request whose turn on the engine came too late to state an answer (its prompt and the answer's
    rounds of its rows as the latest call took them) is dropped unstarted, which the server answers 429:
    started, it would have been cut with nothing said.  Time moves only with the fake engine's steps
    (2 ms each)."""
    from edgetts.engines import create as create_engine
    from edgetts.models.families import FAMILIES
    from edgetts.runtime.executor import SerialEngine
    from edgetts.timing import ANSWER_ROUNDS

    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    fam = FAMILIES["tiny"]
    script = ["x"] * 5 + ["\n", fam.think_end, f"{fam.answer_prefix}1"]
    serial = SerialEngine(create_engine("fake", scripts=[script], step_seconds=0.002))

    def run(deadline_ms):
        return create("single", serial, fam, RunConfig(budget=64, deadline_ms=deadline_ms)).run("q")

    assert run(1000).answer == "1"  # the engine's steps are measured: 2 ms
    assert serial.stalls.row_step_s == pytest.approx(0.002)
    late = run(0.9 * ANSWER_ROUNDS * 2)  # less than the answer's rounds: never started
    assert late.generated_tokens == 0 and late.early_stop == "deadline"
    assert run(3 * ANSWER_ROUNDS * 2).answer is not None  # room for them: it runs and answers
    # Four rows need four times a row's steps (on a CPU a step costs about its rows): the same time is too little.
    wide = create("majority", serial, fam, RunConfig(n=4, budget=64, deadline_ms=3 * ANSWER_ROUNDS * 2)).run("q")
    assert wide.generated_tokens == 0 and wide.early_stop == "deadline"


def test_a_fresh_server_has_run_each_point_before_its_first_request(direct_profile, tmp_path):
    """The first requests of a fresh server met a batch whose step cost came from bare decodes alone and were
    admitted at predictions several times too short under a burst: every point runs once at start-up,
    through the shared batch as a request would, and nothing of it is counted as a request."""
    from edgetts.runtime.http import create_app

    d = tmp_path / "p"
    shutil.copytree(direct_profile, d)
    said = []
    app = create_app(str(d / "pareto.json"), threads=1, notify=said.append)
    try:
        server = app.state.server
        assert any("(warm-up)" in line for line in said), said
        [(engine, _)] = server.executor.engines.values()
        assert engine.scheduler.speed.rounds > 0  # rounds served as requests' are (the bare decodes are not)
        assert "edgetts_requests_total{" not in server.metrics.render()  # no request counted
    finally:
        app.state.server.executor.close()
