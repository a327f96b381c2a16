"""Engine specs end to end: one opening place, specs carried through profiles and Pareto configs,
every engine a manifest names, and strategies that profiling learns about from the class."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.engines import ContextPlan, EngineError, EngineSpec, open_engine
from edgetts.engines.spec import FORCED_SLACK, artifact_format
from edgetts.models import BUILTIN, BUILTIN_ONNX
from edgetts.pareto.config import build_config, point_spec
from edgetts.profiling.config import ConfigError, SweepConfig
from edgetts.profiling.runner import run_profile
from edgetts.strategies import STRATEGIES, pooling, register
from edgetts.strategies.base import Strategy

runner = CliRunner()


def test_spec_round_trip_labels_and_errors(tmp_path):
    spec = EngineSpec.from_dict({"engine": "openai-http", "model": "tiny", "url": "http://127.0.0.1:1/v1",
                                 "options": {"parallel": "n"}})  # fmt: skip
    assert EngineSpec.from_dict(spec.to_dict()) == spec
    assert spec.label == "openai-http:tiny@http://127.0.0.1:1/v1"
    assert EngineSpec.from_dict("tiny").resolved() == EngineSpec("llama.cpp", "tiny")
    assert EngineSpec.from_dict("tiny").label == "tiny"
    assert EngineSpec(artifact=str(BUILTIN_ONNX["tiny"])).resolved().engine == "onnx-genai"
    assert artifact_format(str(BUILTIN["tiny"])) == "gguf"
    with pytest.raises(EngineError, match="unknown key"):
        EngineSpec.from_dict({"engine": "llama.cpp", "path": "x"})
    with pytest.raises(EngineError, match="takes no option 'provider'"):
        open_engine({"engine": "llama.cpp", "artifact": "tiny", "options": {"provider": "cuda"}})
    with pytest.raises(EngineError, match="must be int"):
        open_engine({"engine": "llama.cpp", "artifact": "tiny", "options": {"threads": "two"}})
    with pytest.raises(EngineError, match="unknown family"):
        open_engine({"artifact": "tiny", "options": {"family": "nope"}})
    with pytest.raises(EngineError, match="needs a server URL"):
        open_engine({"engine": "openai-http", "artifact": "tiny"})
    with pytest.raises(EngineError, match="no TensorRT plan"):
        open_engine({"engine": "tensorrt", "artifact": str(tmp_path)})


def test_tensorrt_plans_are_refused_without_their_gpu(tmp_path):
    from edgetts.quantization.tensorrt import cuda_gpu

    if cuda_gpu() is not None:
        pytest.skip("a CUDA GPU is here: test_tensorrt_plan_loads_on_its_gpu covers it")
    (tmp_path / "model.plan").write_bytes(b"a plan from some other machine")
    spec = EngineSpec(artifact=str(tmp_path))
    assert spec.resolved().engine == "tensorrt"
    with pytest.raises(EngineError, match=r"^no CUDA GPU here"):
        open_engine(spec)
    r = runner.invoke(app, ["run", "--model", str(tmp_path), "Evaluate left to right: 1+2"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: no CUDA GPU")


@pytest.mark.gpu
def test_tensorrt_plan_loads_on_its_gpu(tmp_path):
    """On a CUDA machine with TensorRT: a plan compiled here passes every check up to decoding."""
    pytest.importorskip("tensorrt")
    onnx = tmp_path / "onnx"
    shutil.copytree(BUILTIN_ONNX["tiny"], onnx)
    r = runner.invoke(app, ["compile", str(onnx), "--precision", "fp16", "--out", str(tmp_path / "trt")])
    assert r.exit_code == 0, r.output
    with pytest.raises(EngineError, match="decoding through a TensorRT plan is not supported yet"):
        open_engine({"artifact": str(tmp_path / "trt")})


def test_one_context_formula_sized_from_what_is_decoded():
    plan = ContextPlan(max_rows=8, max_tokens=160, prompt_tokens=100, probe_tokens=32)
    assert plan.n_ctx >= 100 + 8 * (160 + FORCED_SLACK + 32) and plan.n_ctx % 64 == 0
    engine, family = open_engine("tiny", max_rows=4, max_tokens=96)
    assert engine.n_ctx == ContextPlan(4, 96).n_ctx and engine.max_rows == 4 and family.name == "tiny"
    with pytest.raises(EngineError, match="between 1 and 4"):
        engine.sample("12+7\n<think>", 5, engine_params(8))
    with pytest.raises(EngineError, match="exceeds the context"):
        engine.sample("12+7\n<think>", 4, engine_params(engine.n_ctx))
    engine.close()
    with pytest.raises(EngineError, match="positive integer"):
        ContextPlan(max_rows=0)


def engine_params(max_tokens):
    from edgetts.engines import SamplingParams

    return SamplingParams(max_tokens=max_tokens)


def test_sweep_models_accept_specs_and_flags_reach_them():
    cfg = SweepConfig(models=["tiny", {"engine": "onnx-genai", "artifact": "tiny", "options": {"provider": "cpu"}}],
                      engine={"threads": 2})  # fmt: skip
    specs = cfg.specs()
    assert specs[0] == EngineSpec("llama.cpp", "tiny", None, {"threads": 2})
    assert specs[1] == EngineSpec("onnx-genai", "tiny", None, {"provider": "cpu"})  # threads is not its option
    http = SweepConfig(models=["tiny"], engine={"name": "openai-http", "url": "http://127.0.0.1:9/v1"})
    assert http.specs() == [EngineSpec("openai-http", "tiny", "http://127.0.0.1:9/v1")]
    for bad in ({"engine": {"name": "vllm"}}, {"engine": {"url": "ftp://x"}}, {"models": [{"engine": 3}]}):
        with pytest.raises(ConfigError):
            SweepConfig(**bad)
    r = runner.invoke(app, ["profile", "--engine", "onnx-genai", "--strategies", "weighted", "--quiet",
                            "--limit", "2", "--out", "/nonexistent/never"])  # fmt: skip
    assert r.exit_code == 2 and "lacks it" in r.output and "\n" not in r.output.strip()


class FirstAnswer(Strategy):
    """A toy strategy: n rows in one batch, the first row that states an answer wins."""

    name = "toy-first-answer"
    pooled = True

    @classmethod
    def pool_estimate(cls, n, samples, verdicts, rng):
        one = pooling.mean_of_rows(samples, verdicts)  # which row answers first is any row, by symmetry
        return pooling.Estimate(one.correct, n * one.tokens, n * one.thinking, float(n))

    def run(self, question):
        import time

        t0 = time.perf_counter()
        res, ctl = self.sample(self.prompt(question), self.cfg.n, t0, self.seeds(0, self.cfg.n))
        rows = [self.row_trace(r, ctl) for r in res.rows]
        answer = next((r.answer for r in rows if r.answer is not None), None)
        return self.trace(rows, answer, {answer: 1.0} if answer else {}, t0, res.ttft)


@pytest.fixture
def toy():
    register(FirstAnswer)
    yield FirstAnswer.name
    STRATEGIES.pop(FirstAnswer.name)


@pytest.mark.parametrize("mode", ["pooled", "direct"])
def test_a_registered_strategy_is_profiled_without_touching_profiling(toy, mode, tmp_path):
    cfg = SweepConfig(limit=10, strategies=[toy, "single"], budgets=[16, 48], n=[2], mode=mode, warmup=0)
    summary = run_profile(cfg, tmp_path)
    cells = {(c["strategy"], c["n"], c["budget"]): c for c in summary["cells"]}
    assert set(cells) == {(toy, 2, 16), (toy, 2, 48), ("single", 1, 16), ("single", 1, 48)}
    for c in cells.values():
        assert c["queries"] == 10 and 0 <= c["accuracy"] <= 1 and c["latency_s"]["p50"] > 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in records if r["strategy"] == toy} == {mode}
    assert all(r["engine"] == {"engine": "llama.cpp", "artifact": "tiny"} for r in records)
    assert cells[(toy, 2, 48)]["tokens"]["rows"] == 2


def test_manifest_variants_of_every_format_profile_into_one_frontier(tmp_path):
    from edgetts.quantization.manifest import add_artifact

    variants = tmp_path / "variants"
    variants.mkdir()
    shutil.copy(BUILTIN["tiny"], variants / "tiny-f16.gguf")
    shutil.copytree(BUILTIN_ONNX["tiny"], variants / "tiny-onnx-int4")
    add_artifact(variants, variants / "tiny-f16.gguf", "gguf", "f16", BUILTIN["tiny"])
    add_artifact(variants, variants / "tiny-onnx-int4", "onnx", "int4", BUILTIN_ONNX["tiny"])
    r = runner.invoke(app, ["profile", "--model", str(variants / "manifest.json"), "--strategies", "single,majority",
                            "--budgets", "32,64", "--n", "4", "--limit", "10", "--quiet",
                            "--out", str(tmp_path / "prof")])  # fmt: skip
    assert r.exit_code == 0, r.output
    _, candidates = build_config([tmp_path / "prof"])
    engines = {p["engine"] for p in candidates}
    assert engines == {"llama.cpp", "onnx-genai"}
    onnx = [p for p in candidates if p["engine"] == "onnx-genai"]
    assert len(onnx) == 4 and all(p["accuracy"] > 0 for p in onnx)
    records = [json.loads(line) for line in (tmp_path / "prof" / "records.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in records if r["engine"]["engine"] == "onnx-genai"} == {"direct"}  # no probes there
    assert {r["mode"] for r in records if r["engine"]["engine"] == "llama.cpp"} == {"pooled"}
    best_onnx = max(onnx, key=lambda p: p["accuracy"])
    engine, family = open_engine(point_spec(best_onnx), max_rows=4, max_tokens=96)
    assert type(engine).__name__ == "OnnxGenAIEngine" and family.name == "tiny"


def test_a_corrupt_gguf_is_one_line_quoting_llama_cpp(tmp_path):
    import subprocess
    import sys

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(BUILTIN["tiny"].read_bytes()[:100_000])  # the header is there, the tensors are not
    r = subprocess.run([sys.executable, "-m", "edgetts", "run", "--model", str(cut), "Evaluate left to right: 1+2"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "corrupt" in lines[0] and "output.weight" in lines[0]
    with pytest.raises(EngineError, match=r"at most 128 rows"):
        open_engine("tiny", max_rows=129)
