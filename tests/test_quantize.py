"""edgetts quantize / compile: GGUF variants with manifests, recipes, and profiles over variants."""

import json
import os
import shutil
import subprocess
import sys
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
from edgetts.quantization.manifest import add_artifact, artifacts, entries, sha256
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
        with LlamaCppEngine(p, n_ctx=1024, n_threads=1, max_rows=4) as e:
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


# Refused requests: exit 2, one line on stderr, and the output exactly as it was.


def _refused(r, words: str = "") -> None:
    err = r.stderr.strip()
    assert r.exit_code == 2 and err.startswith("error:") and "\n" not in err and words in err, (r.exit_code, r.output)


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def test_a_recipe_checks_every_step_before_writing(variants, tmp_path):
    recipe = str(ROOT / "quantize" / "jetson-agx-orin-64gb.yaml")
    new = tmp_path / "orin"
    r = runner.invoke(app, ["quantize", "--recipe", recipe, str(BUILTIN["tiny"]), "--out", str(new)])
    _refused(r, "needs a Hugging Face directory")
    assert not new.exists()
    old = tmp_path / "old"
    shutil.copytree(variants, old)
    before = _tree(old)
    _refused(runner.invoke(app, ["quantize", "--recipe", recipe, str(BUILTIN["tiny"]), "--out", str(old)]))
    assert _tree(old) == before


def test_missing_extras_are_found_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    r = runner.invoke(app, ["quantize", "tiny", "--to", "q8_0", "--onnx", "int4", "--out", str(tmp_path / "o")])
    _refused(r, "pip install 'edgetts[onnx-build]'")
    assert not (tmp_path / "o").exists()


def test_hugging_face_directory_without_safetensors_points_to_the_converter(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    monkeypatch.delenv("EDGETTS_CONVERTER", raising=False)
    r = runner.invoke(app, ["quantize", str(BUILTIN_HF["tiny"]), "--to", "q8_0", "--out", str(tmp_path / "hf")])
    _refused(r, "convert_hf_to_gguf.py")
    assert "safetensors" in r.stderr and not (tmp_path / "hf").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    _refused(runner.invoke(app, ["quantize", "tiny", "--to", "q8_0", "--out", str(target)]), "not a directory")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"onnx")
    _refused(runner.invoke(app, ["compile", str(tmp_path / "onnx"), "--out", str(target)]), "not a directory")
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "out.txt"]


def test_a_failed_quantize_leaves_nothing_behind(variants, tmp_path, monkeypatch):
    import llama_cpp

    real = llama_cpp.llama_model_quantize

    def q4_0_fails_halfway(src, dst, params):
        if b"q4_0" not in dst:
            return real(src, dst, params)
        Path(dst.decode()).write_bytes(b"half a file")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", q4_0_fails_halfway)
    new = tmp_path / "runs" / "new"
    _refused(runner.invoke(app, ["quantize", "tiny", "--to", "q8_0,q4_0", "--out", str(new)]), "could not quantize")
    assert not (tmp_path / "runs").exists()
    old = tmp_path / "old"
    shutil.copytree(variants, old)
    before = _tree(old)
    _refused(runner.invoke(app, ["quantize", "tiny", "--to", "q8_0,q4_0", "--out", str(old)]))
    assert _tree(old) == before
    # A Hugging Face directory that fails to convert (after every check passed) leaves nothing either.
    other = tmp_path / "mistral"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    _refused(runner.invoke(app, ["quantize", str(other), "--to", "q8_0", "--out", str(new)]), "convert_hf_to_gguf.py")
    assert not (tmp_path / "runs").exists()


def test_a_rerun_replaces_its_artifacts_and_keeps_the_others(variants, tmp_path):
    out = tmp_path / "v"
    shutil.copytree(variants, out)
    r = runner.invoke(app, ["quantize", "tiny", "--to", "q4_0,q4_0,q5_0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    types = sorted(a["type"] for _, a in entries(out / "manifest.json"))
    assert types == ["q4_0", "q4_k_m", "q5_0", "q8_0"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_onnx_exports_are_staged_with_the_rest(tmp_path, monkeypatch):
    from edgetts.quantization import onnx_export

    said = {"error": None, "graph": b"one"}

    def builder(cmd, **kw):  # writes what onnxruntime-genai's builder writes, or fails halfway
        dst = Path(cmd[cmd.index("-o") + 1])
        dst.mkdir()
        (dst / "model.onnx").write_bytes(said["graph"])
        if said["error"]:
            return subprocess.CompletedProcess(cmd, 1, "", f"Traceback (most recent call last):\n{said['error']}")
        (dst / "genai_config.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(onnx_export, "importable", lambda module: True)
    monkeypatch.setattr(onnx_export.subprocess, "run", builder)
    out = tmp_path / "o"
    r = runner.invoke(app, ["quantize", "tiny", "--to", "q4_0", "--onnx", "int4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [a["format"] for _, a in entries(out / "manifest.json")] == ["gguf", "onnx"]
    before = _tree(out)
    said["error"] = "RuntimeError: out of memory"
    r = runner.invoke(app, ["quantize", "tiny", "--to", "q8_0", "--onnx", "int4", "--out", str(out)])
    _refused(r, "builder failed: RuntimeError: out of memory")
    assert _tree(out) == before
    said.update(error=None, graph=b"two")
    assert runner.invoke(app, ["quantize", "tiny", "--onnx", "int4", "--out", str(out)]).exit_code == 0
    ((onnx, entry),) = entries(out / "manifest.json", "onnx")
    assert (onnx / "model.onnx").read_bytes() == b"two" and entry["path"] == "hf-onnx-int4-cpu"
    assert sorted(p.name for p in out.iterdir()) == ["hf-onnx-int4-cpu", "manifest.json", "tiny-q4_0.gguf"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_or_directory_where_a_gguf_belongs_is_refused_at_once(tmp_path):
    fifo, folder = tmp_path / "pipe.gguf", tmp_path / "folder.gguf"
    os.mkfifo(fifo)
    folder.mkdir()
    cases = [[str(fifo), "--to", "q8_0"], [str(folder), "--to", "q8_0"]]
    cases += [["tiny", "--to", "q8_0", "--imatrix", str(p)] for p in (fifo, folder)]
    cases += [["tiny", "--recipe", str(fifo)], ["tiny", "--to", "q8_0", "--threads", "100000"]]  # the latter aborted
    for args in cases:
        # A subprocess, so that a regression (blocking on the pipe) fails here instead of hanging the suite.
        cmd = [sys.executable, "-m", "edgetts", "quantize", *args, "--out", str(tmp_path / "o")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        err = done.stderr.strip()
        assert done.returncode == 2 and err.startswith("error:") and "\n" not in err, (args, done.stderr)
        assert not (tmp_path / "o").exists()


def test_bad_requests_write_nothing(tmp_path):
    out = tmp_path / "o"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("[]")
    for args, words in (
        (["tiny", "--onnx", "int4:cpu:x"], "expected PRECISION[:EXECUTION]"),
        (["tiny", "--onnx", "int4:gpu"], "unknown execution provider"),
        (["tiny", "--onnx", "int4", "--imatrix", str(BUILTIN["tiny"])], "--imatrix applies to GGUF types"),
        (["tiny", "--to", "q8_0", "--imatrix", str(tmp_path / "none.gguf")], "no such imatrix file"),
        (["tiny", "--to", "q8_0", "--imatrix", str(BUILTIN["tiny"])], "no '<tensor>.in_sum2' entries"),
        ([str(BUILTIN_HF["tiny"]), "--to", "q8_0", "--converter", str(tmp_path / "none.py")], "no such converter"),
    ):
        _refused(runner.invoke(app, ["quantize", *args, "--out", str(out)]), words)
        assert not out.exists(), args
    _refused(runner.invoke(app, ["quantize", "tiny", "--to", "q8_0", "--out", str(broken)]), "not an edgetts.manifest")
    assert [p.name for p in broken.iterdir()] == ["manifest.json"]


# Manifests: a file that is not one, or that names files outside its directory, is refused.


def _manifest(d: Path, artifacts) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"schema": "edgetts.manifest/v1", "artifacts": artifacts}))
    return d / "manifest.json"


def _entry(path: str, file: Path) -> dict:
    return {"path": path, "format": "gguf", "type": "f16", "sha256": sha256(file)}


@pytest.mark.parametrize(
    "case, words",
    [
        ("list", "not an edgetts.manifest/v1 manifest"),
        ("number", "artifacts[0]: expected an object"),
        ("no sha256", "artifacts[0]: missing sha256"),
        ("no path", "artifacts[0]: missing path"),
        ("no format", "artifacts[0]: missing format"),
        ("absolute", "is not inside the manifest's directory"),
        ("dotdot", "is not inside the manifest's directory"),
        ("dotdot inside", "is not inside the manifest's directory"),
    ],
)
def test_malformed_manifests_are_refused(tmp_path, case, words):
    outside = tmp_path / "outside.gguf"
    shutil.copy(BUILTIN["tiny"], outside)
    d = tmp_path / "m"
    ok = _entry("../outside.gguf", outside)
    m = {
        "list": None, "number": [5],
        "no sha256": [{k: v for k, v in ok.items() if k != "sha256"}],
        "no path": [{k: v for k, v in ok.items() if k != "path"}],
        "no format": [{k: v for k, v in ok.items() if k != "format"}],
        "absolute": [_entry(str(outside), outside)], "dotdot": [ok],
        "dotdot inside": [_entry("a/../../outside.gguf", outside)],
    }[case]  # fmt: skip
    path = _manifest(d, m)
    if case == "list":
        path.write_text(json.dumps([ok]))
    with pytest.raises(QuantizeError) as e:
        entries(path, verify=False)
    assert words in str(e.value) and "\n" not in str(e.value)
    args = ["profile", "--model", str(path), "--limit", "2", "--out", str(tmp_path / "p"), "--quiet"]
    _refused(runner.invoke(app, args), words)
    assert not (tmp_path / "p").exists()


def test_entries_give_every_format_with_its_entry(variants, tmp_path):
    out = tmp_path / "v"
    shutil.copytree(variants, out)
    onnx = out / "tiny-onnx-int4-cpu"
    onnx.mkdir()
    (onnx / "genai_config.json").write_text("{}")
    add_artifact(out, onnx, "onnx", "int4-cpu", BUILTIN_HF["tiny"])
    m = out / "manifest.json"
    every = entries(m)
    assert [a["format"] for _, a in every] == ["gguf"] * 3 + ["onnx"]
    assert all(p == out / a["path"] for p, a in every)
    assert entries(m, "onnx") == [(onnx, every[-1][1])]
    assert artifacts(m) == [p for p, a in every if a["format"] == "gguf"]
    with pytest.raises(QuantizeError, match="no tensorrt artifacts"):
        entries(m, "tensorrt")
    (onnx / "genai_config.json").write_text('{"changed": 1}')
    with pytest.raises(QuantizeError, match="tiny-onnx-int4-cpu does not match its sha256"):
        entries(m, "onnx")
    assert entries(m, "onnx", verify=False)[0][0] == onnx


def test_ctrl_c_during_a_native_quantization_exits_130_and_leaves_nothing(tmp_path):
    """SIGINT while llama.cpp quantizes (inside the native call, its progress lines flowing): the
    command stops at once with 130 and the output directory it created is gone."""
    import os
    import signal
    import subprocess
    import sys

    src = tmp_path / "narrow.gguf"
    assert runner.invoke(app, ["standin", "--shape", "narrow-qwen3", "--out", str(src)]).exit_code == 0
    out = tmp_path / "variants"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "edgetts", "quantize", str(src), "--to", "q6_k,q4_k_m,q3_k_m,q2_k", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # a progress line: llama.cpp is inside llama_model_quantize now
        if "tensors (" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)  # a hang guard; "at once" is the next assertion
    assert proc.returncode == 130, err
    assert "q2_k:" not in rest  # stopped inside the first variant, never went on to the last
    assert "interrupted" in err and "Exception ignored" not in err
    assert not out.exists()  # nothing staged is left, and the folder this run created is removed


def test_an_output_folder_of_other_files_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _refused(runner.invoke(app, ["quantize", "tiny", "--to", "q8_0", "--out", str(mine)]), "holds files of its own")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_gguf_that_is_already_quantized_is_named_by_its_type(variants):
    r = runner.invoke(app, ["quantize", str(variants / "tiny-q4_k_m.gguf"), "--to", "q4_0", "--out",
                            str(variants.parent / "again")])  # fmt: skip
    _refused(r, "is already q4_k_m")
