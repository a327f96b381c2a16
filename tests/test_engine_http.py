"""The OpenAI-compatible HTTP engine against a live llama-cpp-python server on the tiny model."""

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgetts.engines import EngineError, SamplingParams, create
from edgetts.engines.base import EngineFailure
from edgetts.engines.openai_http import OpenAIHTTPEngine
from edgetts.models.families import FAMILIES
from edgetts.tasks.grading import extract_answer

pytest.importorskip("llama_cpp.server")
FAM = FAMILIES["tiny"]
PROMPT = FAM.prompt_template.format(question="Evaluate left to right: 12+7*3")


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def test_parallel_rows_over_http(server):
    with create("openai-http", server) as e:
        assert e.parallel_rows and not e.steppable
        res = e.sample(PROMPT, 4, SamplingParams(seed=5, max_tokens=80))
        again = e.sample(PROMPT, 4, SamplingParams(seed=5, max_tokens=80))
    assert len(res.rows) == 4 and all(r.text for r in res.rows)
    assert res.texts == again.texts  # per-row seeds reach the server
    assert all(0 < r.n_generated <= 80 for r in res.rows)
    assert any(extract_answer(t) == "57" for t in res.texts)


def test_budget_and_forcing_through_a_second_request(server):
    with create("openai-http", server) as e:
        cut = e.sample(PROMPT, 2, SamplingParams(seed=1, max_tokens=4), controller=_cut)
    for r in cut.rows:
        assert sum(r.forced) == 1 and r.n_generated > 4
        assert (FAM.think_end + FAM.answer_prefix) in r.text
        assert r.text.index(FAM.think_end) > 0
        assert extract_answer(r.text) is not None


def _cut(ctl, stepped):
    """Budget forcing for an engine that cannot step: force the answer after a round cut by its budget."""
    for i in stepped:
        r = ctl.rows[i]
        if r.finish_reason == "length" and FAM.think_end not in r.text:
            ctl.force(i, FAM.think_end + FAM.answer_prefix, extra_tokens=12)


def test_unreachable_server_is_a_clear_error():
    # the server's fault, not the request's: serve answers 503 with Retry-After
    with create("openai-http", "http://127.0.0.1:9", timeout=2) as e, pytest.raises(EngineFailure, match="request"):
        e.sample(PROMPT, 1, SamplingParams(max_tokens=4))


def test_strategies_keep_their_budget_over_http(server):
    from edgetts.engines import open_engine
    from edgetts.strategies import RunConfig
    from edgetts.strategies import create as strategy

    engine, family = open_engine({"engine": "openai-http", "url": server, "artifact": "tiny"})
    assert family.name == "tiny"
    cfg = RunConfig(n=4, budget=6, answer_tokens=12)
    for name in ("majority", "esc", "adaptive", "first-finish", "single", "length-hint"):
        trace = strategy(name, engine, family, cfg).run("Evaluate left to right: 87*6-98+45*3")
        assert trace.rows, name
        for r in trace.rows:
            # Every row was cut at its thinking budget: the forced end of thinking, then an answer.
            assert r.forced_answer and r.thinking_tokens == 6, (name, r)
            assert 0 < r.answer_tokens <= 12 and r.answer is not None, (name, r)
            assert r.text.count(FAM.think_end) == 1 and FAM.answer_prefix in r.text
    roomy = strategy("majority", engine, family, RunConfig(n=2, budget=200)).run("Evaluate left to right: 12+7*3")
    assert all(not r.forced_answer and r.finish_reason == "stop" and r.answer_tokens > 0 for r in roomy.rows)
    assert roomy.answer == "57"
    for name in ("budget-forcing", "weighted", "best-of-n"):  # need steps or log-probs: refused, one line
        with pytest.raises(ValueError, match="lacks it") as err:
            strategy(name, engine, family, cfg)
        assert "\n" not in str(err.value)
    engine.close()


def test_profile_through_a_server_agrees_with_the_in_process_engine(server, tmp_path):
    import json

    from typer.testing import CliRunner

    from edgetts.cli import app

    common = ["profile", "--model", "tiny", "--strategies", "majority,esc", "--budgets", "64", "--n", "4",
              "--mode", "direct", "--limit", "30", "--quiet"]  # fmt: skip
    runner = CliRunner()
    local = runner.invoke(app, [*common, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, [*common, "--engine", "openai-http", "--url", server + "/v1",
                                 "--out", str(tmp_path / "http")])  # fmt: skip
    assert remote.exit_code == 0, remote.output
    cells = {}
    for name in ("local", "http"):
        for c in json.loads((tmp_path / name / "summary.json").read_text())["cells"]:
            cells[(name, c["strategy"])] = c
    for s in ("majority", "esc"):
        a, b = cells[("local", s)], cells[("http", s)]
        assert a["queries"] == b["queries"] == 30
        # Two samplers (ours, the server's) on the same problems: each accuracy inside the other's interval.
        assert a["accuracy_ci95"][0] <= b["accuracy"] <= a["accuracy_ci95"][1], (s, a["accuracy"], b["accuracy"])
        assert b["accuracy_ci95"][0] <= a["accuracy"] <= b["accuracy_ci95"][1], (s, a["accuracy"], b["accuracy"])
        assert b["engine"]["engine"] == "openai-http" and b["engine"]["url"] == server + "/v1"
    front = json.loads((tmp_path / "http" / "pareto.json").read_text())["frontier"]
    assert front and all(p["engine"] == "openai-http" and p["url"] == server + "/v1" for p in front)
    assert all(p["id"].startswith("openai-http:tiny@") for p in front)


def test_serve_answers_from_points_that_name_a_server(server, tmp_path):
    """`edgetts serve` on a config whose points run through openai-http (the scale-out path)."""
    import subprocess
    import sys
    import time

    import httpx
    import openai
    from typer.testing import CliRunner

    from edgetts.cli import app

    r = CliRunner().invoke(app, ["profile", "--engine", "openai-http", "--url", server, "--model", "tiny",
                                 "--strategies", "single,majority", "--budgets", "64", "--n", "2", "--mode",
                                 "direct", "--limit", "5", "--quiet", "--out", str(tmp_path / "p")])  # fmt: skip
    assert r.exit_code == 0, r.output
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgetts", "serve", "--config", str(tmp_path / "p" / "pareto.json"),
                             "--port", str(port), "--deadline-ms", "60000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        out = client.completions.create(model="edgetts", prompt="Evaluate left to right: 12+7*3",
                                        extra_body={"deadline_ms": 60000})  # fmt: skip
        info = out.model_extra["edgetts"]
        assert info["engine"] == "openai-http" and info["point_id"].startswith("openai-http:tiny@")
        assert out.choices[0].text == "57" and info["deadline_met"]
    finally:
        proc.terminate()
        proc.wait(10)


ANSWER = (200, b'{"choices": [{"text": " 29", "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}')


@contextlib.contextmanager
def upstream(answer):
    """A scripted OpenAI-compatible server: each call is answered ``answer()``'s (status, body); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answer()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a call the engine gave up on: writing its answer fails, as it should

    httpd = Quiet(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_calls_run_concurrently_up_to_the_bound():
    """A server in front of a batching upstream sends its requests' calls at once, up to
    ``concurrency``: the upstream sees them together (one at a time wasted its batching)."""
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow():
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return ANSWER

    with upstream(slow) as url:
        engine = OpenAIHTTPEngine(url, concurrency=3)
        assert engine.thread_safe
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: engine.sample("q", 1, SamplingParams(max_tokens=4)), range(8)))
        assert all(r.rows[0].text == " 29" for r in results)
        assert state["most"] == 3  # at once, and never more than the bound
        engine.close()


@pytest.mark.parametrize("status, body, why", [
    (200, b'{"choices": [{"text": " 29"}], "usage": {"completion_tokens": 1000000000000}}', "completion_tokens"),
    (200, b'{"choices": [{"text": " 29"}], "usage": {"completion_tokens": "3"}}', "completion_tokens"),
    (200, b'{"choices": [{"text": " 29"}], "usage": 7}', "completion_tokens"),
    (200, b'{"choices": [{"text": 29}]}', "a choice without text"),
    (200, b'{"choices": ["x"]}', "a choice without text"),
    (200, b'{"choices": []}', "no choices"),
    (200, b"[" * 100000 + b"]" * 100000, "no choices"),
    (500, b'{"error": "down"}', "answered 500"),
    (429, b'{"error": "busy"}', "answered 429"),
    (400, b'{"error": "prompt too long"}', "answered 400"),  # the request's fault
])  # fmt: skip
def test_a_broken_upstream_answer_is_an_engine_failure(status, body, why):
    """An upstream's answer is checked before a row is extended by it: a token count of 10^12 sized a list
    by it (memory ran out), a string or a choice without text was a TypeError, deep nesting a
    RecursionError. Each, and an upstream failing or busy, is the engine's failure (503 with Retry-After
    in serve; it was a 400 that clients do not retry); an upstream's 4xx stays the request's error."""
    with upstream(lambda: (status, body)) as url:
        engine = OpenAIHTTPEngine(url)
        with pytest.raises(EngineError, match=why) as e:
            engine.sample("q", 2, SamplingParams(max_tokens=4))
        assert isinstance(e.value, EngineFailure) == (status != 400)
        engine.close()


def test_a_call_ends_at_its_request_s_deadline_not_the_engine_s_timeout():
    """An upstream slower than the request's deadline held the request for the engine's timeout (600 s by
    default); each call is bounded by what the deadline leaves (and a little), its rows then end
    ``deadline``, and without a deadline the engine's own timeout still applies."""
    answered = threading.Event()

    def slow():
        time.sleep(1.5)
        answered.set()
        return ANSWER

    class Deadline:  # what the engine reads of a strategy's controller
        def __init__(self, seconds):
            self.started, self.deadline_s = time.perf_counter(), seconds

        def __call__(self, ctl, active):
            pass

    with upstream(slow) as url:
        engine = OpenAIHTTPEngine(url, timeout=30)
        cut = engine.sample("q", 2, SamplingParams(max_tokens=4), controller=Deadline(0.2))
        # back before the upstream answered, its rows cut there (an order of events, not a time bound)
        assert not answered.is_set() and [r.finish_reason for r in cut.rows] == ["deadline", "deadline"]
        whole = engine.sample("q", 1, SamplingParams(max_tokens=4))  # no deadline: the call is waited for
        assert whole.rows[0].text == " 29"
        with pytest.raises(EngineFailure, match="request failed"):  # the engine's own timeout is a failure
            OpenAIHTTPEngine(url, timeout=0.3).sample("q", 1, SamplingParams(max_tokens=4), controller=Deadline(5.0))
        engine.close()
