"""The OpenAI-compatible HTTP engine against a live llama-cpp-python server on the tiny model."""

import socket
import subprocess
import sys
import time

import httpx
import pytest

from edgetts.engines import EngineError, SamplingParams, create
from edgetts.models.families import FAMILIES
from edgetts.tasks.grading import extract_answer

pytest.importorskip("llama_cpp.server")
FAM = FAMILIES["tiny"]
PROMPT = FAM.prompt_template.format(question="Evaluate left to right: 12+7*3")


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("llama-cpp-python server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


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
    with create("openai-http", "http://127.0.0.1:9", timeout=2) as e, pytest.raises(EngineError, match="request"):
        e.sample(PROMPT, 1, SamplingParams(max_tokens=4))
