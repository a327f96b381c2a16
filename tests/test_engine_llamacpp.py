"""The batched llama.cpp primitive on the real tiny model."""

import pytest

from edgetts.engines import EngineError, SamplingParams, create
from edgetts.engines.llamacpp import LlamaCppEngine
from edgetts.models.families import FAMILIES
from edgetts.tasks import arith

FAM = FAMILIES["tiny"]


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    e = LlamaCppEngine(tiny_gguf, n_ctx=4096, n_threads=1, max_rows=8)
    yield e
    e.close()


def prompts(k):
    return [FAM.prompt_template.format(question=p.question) for p in arith.eval_split()[::100][:k]]


def test_registry_builds_engine_by_name(tiny_gguf):
    with create("llama.cpp", tiny_gguf, n_ctx=512, max_rows=2) as e:
        assert e.parallel_rows and e.forced_tokens and e.logprobs and e.steppable
    with pytest.raises(EngineError, match="unknown engine"):
        create("vllm-magic")


def test_greedy_rows_match_single_row_runs(engine, record_property):
    diverged = 0
    for prompt in prompts(5):
        single = engine.sample(prompt, 1, SamplingParams(temperature=0, max_tokens=96, logprobs=2)).rows[0]
        batch = engine.sample(prompt, 8, SamplingParams(temperature=0, max_tokens=96))
        for row in batch.rows:
            if row.tokens == single.tokens:
                continue
            # Batched arithmetic may only flip a near-tie between the two best tokens.
            k = next(i for i, (a, b) in enumerate(zip(row.tokens, single.tokens)) if a != b)
            top2 = sorted(single.top_logprobs[k].values(), reverse=True)[:2]
            assert top2[0] - top2[1] < 1e-3, f"row {row.index} diverged at token {k} without a near-tie"
            diverged += 1
    record_property("diverged_rows_of_40", diverged)
    assert diverged <= 4, f"{diverged} of 40 rows diverged"


def test_same_seeds_same_outputs_and_rows_differ(engine):
    p = prompts(5)[4]  # a level-5 problem: rows disagree
    a = engine.sample(p, 6, SamplingParams(seed=11, max_tokens=64)).texts
    b = engine.sample(p, 6, SamplingParams(seed=11, max_tokens=64)).texts
    assert a == b
    assert len(set(a)) > 1
    c = engine.sample(p, 2, SamplingParams(max_tokens=64), seeds=[11 + 3, 11 + 4]).texts
    assert c == a[3:5]  # per-row seeds make a row independent of its batch


def test_every_seed_repeats_even_the_one_llama_cpp_reads_as_random(engine):
    """llama.cpp draws a random seed for 0xFFFFFFFF (seed -1, or seed + i past 2**32 - 2): such a row
    would differ from run to run; edgetts gives it seed 0's tokens instead, as the C runtime does."""
    p = prompts(5)[4]
    params = SamplingParams(max_tokens=48)
    runs = [engine.sample(p, 3, params, seeds=[-1, 2**32 - 1, 0]).texts for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and len(set(runs[0])) == 1
    assert engine.sample(p, 1, SamplingParams(seed=2**32 + 5, max_tokens=48)).texts == \
        engine.sample(p, 1, SamplingParams(seed=5, max_tokens=48)).texts  # 32 bits, as llama.cpp takes


def test_forcing_one_row_leaves_the_others_unchanged(engine):
    p = prompts(3)[2]
    params = SamplingParams(seed=3, max_tokens=80)
    plain = engine.sample(p, 4, params)

    def force_row_1(ctl, stepped):
        r = ctl.rows[1]
        if not r.finished and r.n_generated == 4 and not any(r.forced):
            ctl.force(1, FAM.think_end + FAM.answer_prefix)

    forced = engine.sample(p, 4, params, controller=force_row_1)
    assert [forced.texts[i] for i in (0, 2, 3)] == [plain.texts[i] for i in (0, 2, 3)]
    row = forced.rows[1]
    assert (FAM.think_end + FAM.answer_prefix) in row.text
    assert row.text.startswith(plain.rows[1].pieces[0])
    assert sum(row.forced) == len(engine.tokenize(FAM.think_end + FAM.answer_prefix))
    assert row.finish_reason == "stop"  # it went on decoding after the forced text and ended


def test_stopping_a_row_stops_its_token_count(engine):
    p = prompts(4)[3]

    def stop_row_2(ctl, stepped):
        if len(ctl.rows[2].tokens) >= 5:
            ctl.stop(2)

    res = engine.sample(p, 3, SamplingParams(seed=1, max_tokens=100), controller=stop_row_2)
    assert len(res.rows[2].tokens) == 5 and res.rows[2].finish_reason == "stopped"
    assert len(res.rows[0].tokens) > 5


def test_stop_all_ends_the_call(engine):
    res = engine.sample(prompts(1)[0], 4, SamplingParams(max_tokens=100), controller=lambda c, s: c.stop_all())
    assert all(len(r.tokens) == 1 and r.finish_reason == "stopped" for r in res.rows)


def test_budget_logprobs_and_timing(engine):
    res = engine.sample(prompts(5)[4], 3, SamplingParams(seed=2, max_tokens=7, logprobs=3))
    for r in res.rows:
        assert r.n_generated == 7 and r.finish_reason == "length"
        assert len(r.logprobs) == 7 and all(lp <= 0 for lp in r.logprobs)
        assert all(len(t) == 3 for t in r.top_logprobs)
        assert r.times == sorted(r.times)
    assert 0 < res.ttft <= res.wall
    assert res.prompt_tokens == len(engine.tokenize(prompts(5)[4])) + 1  # plus BOS


def test_bad_models_and_shapes(tmp_path, engine):
    with pytest.raises(EngineError, match="no such file"):
        LlamaCppEngine(tmp_path / "missing.gguf")
    # below its sequences llama.cpp aborted the process on the first decode; a negative n_batch failed it
    for kwargs, said in (({"n_ctx": 8}, "n_ctx must be at least 256 for 4 row"), ({"n_ctx": -1}, "n_ctx must be"),
                         ({"n_batch": -5}, "n_batch must be at least 1")):  # fmt: skip
        with pytest.raises(EngineError, match=said):
            LlamaCppEngine(engine.path, **{"n_ctx": 512, "max_rows": 4, **kwargs})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but not really a model")
    with pytest.raises(EngineError, match="could not load"):
        LlamaCppEngine(junk)
    with pytest.raises(EngineError, match="exceeds the context"):
        engine.sample(prompts(1)[0], 8, SamplingParams(max_tokens=1000))
    with pytest.raises(EngineError, match="n must be between"):
        engine.sample(prompts(1)[0], 9, SamplingParams())
    for t in (-1, float("nan"), float("inf")):  # inf would make every token alike: noise, not sampling
        with pytest.raises(EngineError, match="temperature"):
            SamplingParams(temperature=t)


def test_probes_branch_a_row_without_disturbing_it(engine):
    p = prompts(5)[4]
    params = SamplingParams(seed=3, max_tokens=90)
    plain = engine.sample(p, 4, params)

    def probe_at_10_and_30(ctl, stepped):
        for i in stepped:
            r = ctl.rows[i]
            if not r.finished and r.n_generated in (10, 30):
                ctl.probe(i, FAM.think_end + FAM.answer_prefix, 12, label=r.n_generated, seed=r.n_generated)

    probed = engine.sample(p, 4, params, controller=probe_at_10_and_30)
    assert probed.texts == plain.texts  # the rows went on exactly as without probes
    for r in probed.rows:
        assert set(r.probes) == {10, 30}
        text, k = r.probes[10]
        assert text.startswith(FAM.think_end + FAM.answer_prefix) and 0 < k <= 12
    # A probe answers like a direct cut at the same point, up to the sampler's draw.
    cut = engine.sample(p, 1, SamplingParams(seed=3, max_tokens=10))
    assert cut.rows[0].text == plain.rows[0].text[: len(cut.rows[0].text)]
    # A cache stream per row has no scratch sequences: a probe is a clear error, not an abort.
    split = LlamaCppEngine(engine.path, n_ctx=1024, n_threads=1, max_rows=4, kv_unified=False)
    try:
        assert not split.probes
        with pytest.raises(EngineError, match="probes need a unified cache"):
            split.sample(p, 4, params, controller=probe_at_10_and_30)
        assert split.sample(p, 4, params).texts == plain.texts  # and the engine goes on
    finally:
        split.close()
