"""Random-weight stand-ins of Qwen3 and DeepSeek-R1-Distill: real vocabulary, templates and shapes, end to end.

The narrow stand-ins (two thin layers, the real 151,936-token vocabulary and chat templates) run
through the prompt rendering, budget forcing with the real ``</think>`` token, answer extraction,
``run``, ``profile``, ``pareto``, ``serve`` and ``quantize``.  Their output text is noise, so the
tests check structure (token ids, prompt ends, where answers are read), never answers.
"""

import json
import time

import pytest
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.engines import EngineSpec, SamplingParams, open_engine
from edgetts.models.families import FAMILIES, build_prompt
from edgetts.models.standin import SHAPES, THINK_IDS, StandinError, write_standin
from edgetts.strategies import RunConfig, create
from edgetts.tasks.grading import extract_answer

runner = CliRunner()
Q = "Evaluate left to right: 8*4-3"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    d = tmp_path_factory.mktemp("standin")
    out = {}
    for shape in ("narrow-qwen3", "narrow-r1"):
        r = runner.invoke(app, ["standin", "--shape", shape, "--out", str(d / f"{shape}.gguf")])
        assert r.exit_code == 0, r.output
        assert "noise" in r.output
        out[shape] = d / f"{shape}.gguf"
    return out


@pytest.fixture(scope="module")
def engines(standins):
    spec = {s: EngineSpec(artifact=str(p), options={"threads": 1}) for s, p in standins.items()}
    opened = {s: open_engine(sp, max_rows=4, max_tokens=64) for s, sp in spec.items()}
    yield opened
    for engine, _ in opened.values():
        engine.close()


def test_shapes_match_the_real_models():
    q, r = SHAPES["qwen3-0.6b"], SHAPES["r1-distill-qwen-1.5b"]
    assert (q.layers, q.hidden, q.heads, q.kv_heads, q.head_dim, q.ffn, q.tied, q.qk_norm) == (
        28, 1024, 16, 8, 128, 3072, True, True)  # fmt: skip
    assert (r.arch, r.layers, r.hidden, r.heads, r.kv_heads, r.ffn, r.tied, r.qkv_bias) == (
        "qwen2", 28, 1536, 12, 2, 8960, False, True)  # fmt: skip
    assert q.kv_bytes_per_token == 114688 and r.kv_bytes_per_token == 28672  # 112 KB and 28 KB per token


def test_vocabulary_and_think_tokens_are_real(engines):
    for engine, family in engines.values():
        start, end = THINK_IDS[family.name]
        assert engine.n_vocab == 151936
        assert engine.tokenize("<think>") == [start] and engine.tokenize("</think>") == [end]
        assert engine.tokenize("Hello world") == [9707, 1879]  # Qwen2 BPE ids
    assert THINK_IDS["qwen3"] == (151667, 151668)
    assert engines["narrow-qwen3"][1].name == "qwen3" and engines["narrow-r1"][1].name == "deepseek-r1"


def test_prompts_end_as_the_real_models_expect(engines):
    qwen, qfam = engines["narrow-qwen3"]
    p = build_prompt(qfam, Q, qwen.chat_template())
    assert p == f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    r1, rfam = engines["narrow-r1"]
    p = build_prompt(rfam, Q, r1.chat_template())
    assert p.endswith("<｜Assistant｜><think>\n") and "</think>" not in p  # the model is told to think
    toks = r1.tokenize(p, add_bos=r1.add_bos)
    assert toks[0] == 151646 and toks[1] == 151644  # <｜begin▁of▁sentence｜><｜User｜>
    assert toks[-3] == 151645 and toks[-2] == 151648  # <｜Assistant｜><think>, then "\n"


@pytest.mark.parametrize("shape", ["narrow-qwen3", "narrow-r1"])
def test_budget_forcing_appends_the_real_end_token_and_prefix(engines, shape):
    engine, family = engines[shape]
    end_id = THINK_IDS[family.name][1]
    prefix = engine.tokenize(family.answer_prefix)
    cfg = RunConfig(n=2, budget=8, answer_tokens=6, sampling=SamplingParams(seed=3, ignore_eos=True))
    strat = create("single", engine, family, cfg)
    res, _ = strat.sample(strat.prompt(Q), 2, time.perf_counter(), strat.seeds(0, 2))
    for row in res.rows:
        at = row.tokens.index(end_id)
        assert at == 8 and row.forced[at] and all(row.forced[at : at + 1 + len(prefix)])
        assert row.tokens[at + 1 : at + 1 + len(prefix)] == prefix
        answer = row.text.split(family.think_end)[-1]
        assert answer.startswith(family.answer_prefix)
        # the answer is read after the forced end token: a reasoning that states another answer
        # ("####" outranks every other form) does not change what is read
        read = extract_answer(row.text, family.think_start, family.think_end)
        cut = row.text.rindex(family.think_end)
        decoy = f"{row.text[:cut]} #### 987654321\n{row.text[cut:]}"
        assert read != "987654321" and extract_answer(decoy, family.think_start, family.think_end) == read


def test_run_cli_on_both_families(standins):
    for path in standins.values():
        r = runner.invoke(app, ["run", "--model", str(path), "--strategy", "majority", "--n", "2", "--budget", "8",
                                "--threads", "1", "--json", Q])  # fmt: skip
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert d["engine"]["artifact"] == str(path) and d["rows_used"] == 2
        assert all(row["thinking_tokens"] <= 8 and row["forced_answer"] for row in d["rows"])


def test_profile_pareto_and_serve(standins, tmp_path):
    import openai
    from test_server import _start, _stop

    model = str(standins["narrow-qwen3"])
    prof = tmp_path / "profile"
    r = runner.invoke(app, ["profile", "--model", model, "--limit", "3", "--strategies", "single,majority", "--budgets",
                            "8,16", "--n", "1,2", "--threads", "1", "--out", str(prof), "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((prof / "summary.json").read_text())
    assert {c["strategy"] for c in summary["cells"]} == {"single", "majority"}
    records = [json.loads(x) for x in (prof / "records.jsonl").read_text().splitlines()]
    assert all(r["kv_bytes"] > 0 and r["memory_mb"] > 0 for r in records)
    for c in summary["cells"]:  # n rows of budget + answer + slack after the prompt, 256 B per token
        assert c["kv_bytes"] % (256 * 256) == 0 and c["kv_bytes"] >= 256 * c["n"] * (c["budget"] + 32)
    big = max(summary["cells"], key=lambda c: (c["n"], c["budget"]))
    assert big["memory_mb"] >= min(summary["cells"], key=lambda c: (c["n"], c["budget"]))["memory_mb"]
    cfg = tmp_path / "pareto.json"
    r = runner.invoke(app, ["pareto", str(prof), "--out", str(cfg), "--no-plot", "--accept-unvalidated"])
    assert r.exit_code == 0, r.output
    proc, url = _start(cfg, "--threads", "1")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        out = client.chat.completions.create(model="edgetts", messages=[{"role": "user", "content": Q}],
                                             extra_body={"deadline_ms": 60000})  # fmt: skip
        assert out.model_extra["edgetts"]["point_id"].startswith("narrow-qwen3/")
        front = json.loads(cfg.read_text())["frontier"]
        cells = {(c["strategy"], c["n"], c["budget"]): c for c in summary["cells"]}
        assert all(p["memory_mb"] == cells[p["strategy"], p["n"], p["budget"]]["memory_mb"] for p in front)
    finally:
        _stop(proc)


def test_quantize_a_standin(standins, tmp_path):
    r = runner.invoke(app, ["quantize", str(standins["narrow-r1"]), "--to", "q8_0", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (q8,) = tmp_path.glob("*q8_0*.gguf")
    engine, family = open_engine(EngineSpec(artifact=str(q8), options={"threads": 1}), max_rows=1, max_tokens=8)
    try:
        assert family.name == "deepseek-r1" and engine.tokenize("</think>") == [151649]
        assert len(engine.sample("hi", 1, SamplingParams(max_tokens=4, ignore_eos=True)).rows[0].tokens) == 4
    finally:
        engine.close()


def test_bad_shape(tmp_path):
    r = runner.invoke(app, ["standin", "--shape", "llama-70b", "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and r.output.startswith("error: unknown shape")
    with pytest.raises(StandinError):
        write_standin("narrow-qwen3", tmp_path / "x.gguf", dtype="q4")
    mine = tmp_path / "mine.gguf"
    mine.write_text("my notes")
    r = runner.invoke(app, ["standin", "--shape", "narrow-r1", "--out", str(mine)])
    assert r.exit_code == 2 and "not written by edgetts" in r.output and mine.read_text() == "my notes"


def test_a_standin_is_replaced_by_a_new_one(standins, tmp_path):
    import shutil

    copy = tmp_path / "again.gguf"
    shutil.copy(standins["narrow-qwen3"], copy)
    r = runner.invoke(app, ["standin", "--shape", "narrow-qwen3", "--seed", "1", "--out", str(copy)])
    assert r.exit_code == 0, r.output
    assert copy.read_bytes() != standins["narrow-qwen3"].read_bytes() and not list(tmp_path.glob(".*partial"))


def test_families_are_known():
    assert {s.family for s in SHAPES.values()} <= set(FAMILIES)


def test_memory_plan_matches_what_llama_cpp_allocates(standins, capsys):
    from edgetts.engines.llamacpp import LlamaCppEngine
    from edgetts.engines.memory import gguf_info, plan_memory

    path = standins["narrow-qwen3"]
    info = gguf_info(path)
    assert (info.arch, info.layers, info.kv_heads, info.key_length, info.n_vocab) == ("qwen3", 2, 2, 16, 151936)
    plan = plan_memory(info, 2000, 4)
    capsys.readouterr()
    LlamaCppEngine(path, n_ctx=2000, n_threads=1, max_rows=4, verbose=True).close()
    log = capsys.readouterr().err
    line = next(x for x in log.splitlines() if "llama_kv_cache: size =" in x)
    assert plan.n_ctx == int(line.split("(")[1].split()[0]) == 2048
    assert abs(float(line.split("=")[1].split("MiB")[0]) - plan.kv / 2**20) < 0.01
    compute = next(x for x in log.splitlines() if "compute buffer size =" in x)
    assert abs(float(compute.split("=")[1].split("MiB")[0]) - plan.compute / 2**20) < 0.02 * plan.compute / 2**20


@pytest.mark.parametrize("rows,n_ctx", [(5, 3500), (3, 700 * 3), (7, 7 * 300)])
def test_memory_plan_pads_each_stream_as_llama_cpp_does(standins, capsys, rows, n_ctx):
    """With a cache stream per row each stream is padded to 256 cells on its own (llama.cpp's
    ``n_ctx_seq``): 5 streams of 3,500 cells are 5 x 768 = 3,840 cells, not 3,584."""
    from edgetts.engines.llamacpp import LlamaCppEngine
    from edgetts.engines.memory import gguf_info, plan_memory

    path = standins["narrow-qwen3"]
    plan = plan_memory(gguf_info(path), n_ctx, rows, kv_unified=False)
    capsys.readouterr()
    LlamaCppEngine(path, n_ctx=n_ctx, n_threads=1, max_rows=rows, verbose=True, kv_unified=False).close()
    log = capsys.readouterr().err
    line = next(x for x in log.splitlines() if "llama_kv_cache: size =" in x)
    per_stream = int(line.split("(")[1].split()[0])  # the log counts the cells of one stream
    assert f"{rows}/{rows} seqs" in line and plan.n_ctx == rows * per_stream
    assert per_stream % 256 == 0 and plan.n_ctx >= n_ctx
    assert abs(float(line.split("=")[1].split("MiB")[0]) - plan.kv / 2**20) < 0.01
    compute = next(x for x in log.splitlines() if "compute buffer size =" in x)
    assert abs(float(compute.split("=")[1].split("MiB")[0]) - plan.compute / 2**20) < 0.02 * plan.compute / 2**20


def test_a_point_that_cannot_fit_is_refused_before_loading(standins):
    from edgetts.engines import EngineError

    with pytest.raises(EngineError, match=r"needs \d+ MB: weights \d+, KV cache \d+ .*MB free"):
        open_engine(EngineSpec(artifact=str(standins["narrow-qwen3"])), max_rows=64, max_tokens=10**8)
    r = runner.invoke(app, ["run", "--model", str(standins["narrow-r1"]), "--n", "64", "--budget", "100000000", Q])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "MB free" in r.output


def test_logprobs_on_a_large_vocabulary_match_a_float64_reference():
    import ctypes
    from types import SimpleNamespace

    import numpy as np

    from edgetts.engines.llamacpp import LlamaCppEngine

    logits = (np.random.default_rng(0).standard_normal(151936) * 4).astype(np.float32)
    logits[[5, 77, 151935]] = 30.0  # ties at the top, one at the very end
    ptr = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    fake = SimpleNamespace(n_vocab=logits.size, ctx=None, lc=SimpleNamespace(llama_get_logits_ith=lambda ctx, i: ptr))
    ref = logits.astype(np.float64)
    lse = ref.max() + np.log(np.exp(ref - ref.max()).sum())
    for k in (0, 1, 5, 20):
        lp, top = LlamaCppEngine._logprobs(fake, 0, 9, k)
        assert abs(lp - (ref[9] - lse)) < 1e-5
        want = np.argsort(-ref, kind="stable")[:k]
        assert list(top) == [int(t) for t in want]
        assert all(abs(top[int(t)] - (ref[t] - lse)) < 1e-5 for t in want)


def test_a_cache_that_is_a_file_is_said_so(tmp_path, monkeypatch):
    from edgetts.models.standin import cache_dir

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("EDGETTS_CACHE", str(tmp_path / "file"))
    with pytest.raises(StandinError, match=r"EDGETTS_CACHE=.* is not a directory"):  # it was "[Errno 17] File exists"
        cache_dir()
