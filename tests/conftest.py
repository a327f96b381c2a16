import pytest

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

    e = LlamaCppEngine(tiny_gguf, n_ctx=512, n_threads=2, max_rows=4)
    yield e
    e.close()
