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

# A small sweep of the tiny model (five problems, one budget, one strategy), pooled; DIRECT runs
# every cell directly, with no latency model to calibrate and check: quicker for fresh runs.
SMALL = ["--limit", "5", "--budgets", "16", "--strategies", "single", "--quiet"]
DIRECT = [*SMALL, "--mode", "direct"]


def one_line_error(r):
    """The one line a refused command printed (``error: ...``, on stderr, exit status 2)."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def _profile(tmp_path_factory, name, args):
    from typer.testing import CliRunner

    from edgetts.cli import app

    d = tmp_path_factory.mktemp(name) / "profile"
    r = CliRunner().invoke(app, ["profile", "--out", str(d), *args])
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory):
    """A profile directory of SMALL (pooled: latency model and its check); copy it before changing it."""
    return _profile(tmp_path_factory, "small", SMALL)


@pytest.fixture(scope="module")
def direct_profile(tmp_path_factory):
    """A profile directory of DIRECT; copy it before changing it."""
    return _profile(tmp_path_factory, "direct", DIRECT)


@pytest.fixture
def three_points(direct_profile, tmp_path):
    """(config, path): the direct profile's config with three points of 10, 20 and 40 ms at 40, 60 and
    70% (all on the tiny model), for tests of how the policy weighs time against accuracy."""
    import json
    import shutil

    d = tmp_path / "three"
    shutil.copytree(direct_profile, d)
    config = json.loads((d / "pareto.json").read_text())
    base = config["frontier"][0]
    config["frontier"] = [dict(base, id=f"p{ms}", latency_ms=float(ms), accuracy=acc, accuracy_ci95=[acc, acc])
                          for ms, acc in ((10, 0.40), (20, 0.60), (40, 0.70))]  # fmt: skip
    (d / "three.json").write_text(json.dumps(config))
    return config, d / "three.json"


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
