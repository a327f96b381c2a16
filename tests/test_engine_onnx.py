"""The ONNX Runtime GenAI engine on the tiny model in ONNX int4 (as made by the GenAI builder)."""

import shutil
import subprocess
import sys

import pytest

from edgetts.engines import EngineError, SamplingParams, create
from edgetts.models import BUILTIN_ONNX
from edgetts.models.families import FAMILIES
from edgetts.tasks.grading import extract_answer

pytest.importorskip("onnxruntime_genai")
FAM = FAMILIES["tiny"]
QUESTION = "Evaluate left to right: 12+7*3"
PROMPT = FAM.prompt_template.format(question=QUESTION)


def test_shipped_onnx_model_runs_and_answers():
    e = create("onnx-genai", BUILTIN_ONNX["tiny"])
    assert e.steppable and e.forced_tokens and not e.parallel_rows and not e.logprobs and not e.probes
    res = e.sample(PROMPT, 4, SamplingParams(seed=1, max_tokens=80))
    assert len(res.rows) == 4 and res.prompt_tokens > 10
    assert sum(extract_answer(t) == "57" for t in res.texts) >= 2, res.texts
    again = e.sample(PROMPT, 4, SamplingParams(seed=1, max_tokens=80))
    assert again.texts == res.texts  # rows are seeded one by one
    hard = FAM.prompt_template.format(question="Evaluate left to right: 87*6-98+45*3")
    assert len(set(e.sample(hard, 8, SamplingParams(seed=1, max_tokens=80)).texts)) > 1  # ... and differently
    greedy = e.sample(PROMPT, 2, SamplingParams(temperature=0, max_tokens=80))
    assert greedy.rows[0].tokens == greedy.rows[1].tokens


def test_stop_row_and_force_text():
    e = create("onnx-genai", BUILTIN_ONNX["tiny"])

    def stop_row_0(ctl, stepped):
        if len(ctl.rows[0].tokens) >= 3:
            ctl.stop(0)

    res = e.sample(PROMPT, 2, SamplingParams(max_tokens=40), controller=stop_row_0)
    assert len(res.rows[0].tokens) == 3 and res.rows[0].finish_reason == "stopped"

    def cut(ctl, stepped):  # cut the reasoning after 4 tokens and force the answer, as a budget does
        for i in stepped:
            r = ctl.rows[i]
            if not r.finished and r.n_generated == 4 and not any(r.forced):
                ctl.force(i, FAM.think_end + FAM.answer_prefix, extra_tokens=8)

    res = e.sample(PROMPT, 2, SamplingParams(seed=2, max_tokens=4), controller=cut)
    for r in res.rows:
        k = r.forced.index(True)
        assert k == 4 and r.text.startswith("".join(r.pieces[:4])) and FAM.answer_prefix in r.text
        assert 0 < r.n_generated - 4 <= 8  # the granted answer room, no more
        assert extract_answer(r.text) is not None, r.text


def test_strategies_run_under_a_budget():
    from edgetts.engines import open_engine
    from edgetts.strategies import RunConfig
    from edgetts.strategies import create as strategy

    engine, family = open_engine({"engine": "onnx-genai", "artifact": "tiny"}, max_rows=4, max_tokens=48)
    trace = strategy("majority", engine, family, RunConfig(n=4, budget=8, answer_tokens=16)).run(QUESTION)
    assert trace.rows_used == 4
    assert all(r.thinking_tokens <= 8 and r.forced_answer for r in trace.rows if r.finish_reason != "stop")
    assert any(r.forced_answer and r.answer is not None for r in trace.rows)
    with pytest.raises(Exception, match=r"steppable|logprobs"):
        strategy("weighted", engine, family, RunConfig(n=2))


def test_bad_directory(tmp_path):
    with pytest.raises(EngineError, match=r"genai_config\.json"):
        create("onnx-genai", tmp_path)
    with pytest.raises(EngineError, match="unknown provider"):
        create("onnx-genai", BUILTIN_ONNX["tiny"], provider="tpu")


def test_builder_makes_a_runnable_model_from_the_shipped_hf_files(tiny_hf, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx_ir")
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(tiny_hf), "-i", str(tiny_hf),
           "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    res = create("onnx-genai", out).sample(PROMPT, 2, SamplingParams(seed=3, max_tokens=80))
    assert any(extract_answer(t) is not None for t in res.texts)
