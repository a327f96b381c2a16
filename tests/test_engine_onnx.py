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
PROMPT = FAM.prompt_template.format(question="Evaluate left to right: 12+7*3")


def test_shipped_onnx_model_runs_and_answers():
    e = create("onnx-genai", BUILTIN_ONNX["tiny"])
    assert e.parallel_rows and e.steppable and not e.forced_tokens
    res = e.sample(PROMPT, 4, SamplingParams(seed=1, max_tokens=80))
    assert len(res.rows) == 4 and res.prompt_tokens > 10
    assert sum(extract_answer(t) == "57" for t in res.texts) >= 2, res.texts
    greedy = e.sample(PROMPT, 2, SamplingParams(temperature=0, max_tokens=80))
    assert greedy.rows[0].tokens == greedy.rows[1].tokens


def test_stop_row_and_refuse_forcing():
    e = create("onnx-genai", BUILTIN_ONNX["tiny"])

    def stop_row_0(ctl, stepped):
        if len(ctl.rows[0].tokens) >= 3:
            ctl.stop(0)

    res = e.sample(PROMPT, 2, SamplingParams(max_tokens=40), controller=stop_row_0)
    assert len(res.rows[0].tokens) == 3 and res.rows[0].finish_reason == "stopped"
    with pytest.raises(EngineError, match="cannot force"):
        e.sample(PROMPT, 1, SamplingParams(max_tokens=5), controller=lambda c, s: c.force(0, "x"))


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
