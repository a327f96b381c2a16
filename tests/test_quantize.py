"""edgetts quantize / compile: GGUF variants with manifests, recipes, and profiles over variants."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.engines import SamplingParams
from edgetts.engines.llamacpp import LlamaCppEngine
from edgetts.models import BUILTIN, BUILTIN_HF
from edgetts.quantization import QuantizeError
from edgetts.quantization.gguf_quant import inspect, misfits, quantize
from edgetts.quantization.manifest import artifacts, sha256
from edgetts.quantization.recipes import load_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    r = runner.invoke(app, ["quantize", "tiny", "--to", "q8_0,q4_k_m,q4_0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_manifest_lists_every_variant_with_verified_hashes(variants):
    manifest = json.loads((variants / "manifest.json").read_text())
    entries = {a["type"]: a for a in manifest["artifacts"]}
    assert set(entries) == {"q8_0", "q4_k_m", "q4_0"}
    for a in entries.values():
        p = variants / a["path"]
        assert not Path(a["path"]).is_absolute() and p.is_file()
        assert a["sha256"] == sha256(p) and a["bytes"] == p.stat().st_size
        assert a["source"]["sha256"] == sha256(BUILTIN["tiny"]) and a["tools"]["llama-cpp-python"]
    assert entries["q8_0"]["bits_per_weight"] > entries["q4_k_m"]["bits_per_weight"] > 4
    assert [str(p) for p in artifacts(variants / "manifest.json")] == [
        str(variants / a["path"]) for a in entries.values()
    ]


def test_variants_load_and_answer(variants):
    for p in artifacts(variants / "manifest.json"):
        assert inspect(p)[0] != "f16"
        with LlamaCppEngine(p, n_ctx=1024, n_threads=2, max_rows=4) as e:
            res = e.sample("Evaluate left to right: 8*4-3\n<think>", 4, SamplingParams(seed=1, max_tokens=60))
            assert sum("The answer is 29" in t for t in res.texts) >= 2, (p, res.texts)


def test_a_changed_artifact_fails_its_hash(variants, tmp_path):
    copy = tmp_path / "v"
    shutil.copytree(variants, copy)
    target = next(copy.glob("*q4_0.gguf"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(QuantizeError, match="does not match its sha256"):
        artifacts(copy / "manifest.json")
    target.unlink()
    with pytest.raises(QuantizeError, match="is missing"):
        artifacts(copy / "manifest.json")


def test_misfit_tensors_are_named():
    mats = [("blk.0.ffn_down.weight", 512), ("odd.weight", 300)]
    assert misfits(mats, "q4_k_m") == ["odd.weight"]
    assert misfits(mats, "q8_0") == ["odd.weight"]
    assert misfits([("x", 288)], "q4_0") == [] and misfits([("x", 288)], "q6_k") == ["x"]


def test_importance_matrix_changes_the_quantization(tmp_path):
    import gguf

    _, _, mats = inspect(BUILTIN["tiny"])
    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), "imatrix")
    rng = np.random.default_rng(0)
    for name, row in mats:
        w.add_tensor(f"{name}.in_sum2", rng.uniform(0.01, 100.0, row).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.array([1.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    plain = quantize(BUILTIN["tiny"], tmp_path / "a", ["q4_0"], log=lambda m: None)[0]
    weighted = quantize(BUILTIN["tiny"], tmp_path / "b", ["q4_0"], imatrix=str(tmp_path / "imatrix.gguf"),
                        log=lambda m: None)[0]  # fmt: skip
    assert plain["sha256"] != weighted["sha256"] and weighted["imatrix"]
    with LlamaCppEngine(tmp_path / "b" / weighted["path"], n_ctx=512, max_rows=1) as e:
        assert e.sample("Evaluate left to right: 2+3\n<think>", 1, SamplingParams(temperature=0, max_tokens=30)).texts[
            0
        ]


def test_hugging_face_directories(tmp_path):
    r = runner.invoke(app, ["quantize", str(BUILTIN_HF["tiny"]), "--to", "q8_0", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    other = tmp_path / "mistral"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    r = runner.invoke(app, ["quantize", str(other), "--to", "q8_0", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "convert_hf_to_gguf.py" in r.stderr and "\n" not in r.stderr.strip()


def test_bad_inputs_exit_2(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"nope")
    for args in (["tiny", "--to", "q9_9"], [str(junk), "--to", "q8_0"], [str(tmp_path / "none"), "--to", "q8_0"],
                 ["tiny"], [str(BUILTIN["tiny"]), "--onnx", "int4"]):  # fmt: skip
        r = runner.invoke(app, ["quantize", *args, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and r.stderr.startswith("error:"), (args, r.output)


def test_shipped_recipes_load():
    names = sorted(p.stem for p in (ROOT / "quantize").glob("*.yaml"))
    assert names == ["cpu-x86", "jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "rtx-4090-24gb"]
    for n in names:
        r = load_recipe(ROOT / "quantize" / f"{n}.yaml")
        assert r["gguf"] and r["target"] == n


def test_bad_recipe(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("gguf: [q4_k_m]\nflavour: spicy\n")
    with pytest.raises(QuantizeError, match="unknown key"):
        load_recipe(bad)


def test_compile_refuses_without_a_cuda_gpu(tmp_path):
    from edgetts.quantization.tensorrt import cuda_gpu

    if cuda_gpu() is not None:
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    r = runner.invoke(app, ["compile", str(tmp_path), "--precision", "fp16"])
    assert r.exit_code == 2 and "must be built on the target device" in r.stderr
    assert runner.invoke(app, ["compile", str(tmp_path), "--precision", "int3"]).exit_code == 2


def test_profile_over_a_manifest_gives_one_merged_frontier(variants, tmp_path):
    args = ["profile", "--model", str(variants / "manifest.json"), "--limit", "10", "--strategies", "single,majority",
            "--budgets", "32,96", "--n", "4", "--out", str(tmp_path / "p"), "--quiet"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "p" / "pareto.json").read_text())
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert len({c["model"] for c in summary["cells"]}) == 3
    # Variants of the tiny model are recognised by their GGUF name and prompted in its format.
    assert all(c["accuracy"] >= 0.3 for c in summary["cells"] if c["budget"] == 96), summary["cells"]
    assert config["frontier"] and {p["model"] for p in config["frontier"]} <= {c["model"] for c in summary["cells"]}


def test_recipe_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("- q4_k_m\n- q8_0\n")
    with pytest.raises(QuantizeError, match="expected a mapping"):
        load_recipe(bad)
