import os
import socket
import subprocess
import sys
import time

import pytest

# One llama.cpp thread in tests (and the processes they start): with every core busy, llama.cpp's
# threads wait on each other at each step and a descheduled one stalls the rest, so a suite on
# several threads slows down many times over beside other work.  Speed is measured in bench/.
os.environ.setdefault("EDGETTS_THREADS", "1")

from edgetts.models import BUILTIN, BUILTIN_HF


@pytest.fixture(scope="session")
def tiny_gguf():
    return BUILTIN["tiny"]


@pytest.fixture(scope="session")
def tiny_hf():
    return BUILTIN_HF["tiny"]


@pytest.fixture(scope="session")
def tiny_engine(tiny_gguf):
    from edgetts.engines.llamacpp import LlamaCppEngine

    e = LlamaCppEngine(tiny_gguf, n_ctx=512, n_threads=1, max_rows=4)
    yield e
    e.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_gguf):
    """A live OpenAI-compatible server (llama-cpp-python's) on the tiny model, for the HTTP engine."""
    pytest.importorskip("llama_cpp.server")
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # generous: a loaded machine starts it slowly
            if proc.poll() is not None:
                pytest.fail("llama-cpp-python server exited at start")
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
