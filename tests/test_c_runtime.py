"""The runtime in C (``edgetts build-c``): token-for-token parity with the Python runtime, the policy,
sanitizers, and the command line.

The config comes from a small profile of the tiny model; its frontier is replaced by a chosen set
of profiled cells (every strategy the C runtime has, small budgets) sorted by latency, with energy
figures on all but one point so the energy limit is exercised.  Parity runs every row of the C
runtime against the Python strategies on an engine sized as the C runtime sizes its own (the
frontier's largest n and budget), with the same seed and no deadline.  Both sides decode on one
thread: the tiny model gains nothing from more, and a shared machine then runs the suite quickly.
"""

import json
import random
import subprocess
from pathlib import Path

import pytest
from c_policy import CC, build_driver, drive
from typer.testing import CliRunner

from edgetts.cli import app
from edgetts.engines import offload, open_engine
from edgetts.engines.base import Control, SamplingParams
from edgetts.export.build_c import BuildError, build_c
from edgetts.pareto.config import build_config, load_config, point_spec, write_config
from edgetts.profiling.config import SweepConfig
from edgetts.profiling.runner import run_profile
from edgetts.runtime import Policy
from edgetts.strategies import RunConfig, create
from edgetts.tasks.datasets import load_dataset

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")
runner = CliRunner()
WANTED = ["single/n1/b32", "first-finish/n4/b32", "majority/n4/b32", "esc/n8/b32", "adaptive/n8/b16",
          "weighted/n4/b32", "majority/n8/b32"]  # fmt: skip
SEED = 3



@pytest.fixture(scope="module")
def config(tmp_path_factory):
    base = tmp_path_factory.mktemp("c-runtime")
    sweep = SweepConfig(models=["tiny"], limit=10, strategies=["single", "majority", "esc", "adaptive", "first-finish",
                                                               "weighted"],
                        budgets=[16, 32], n=[4, 8], warmup=1, engine={"threads": 1})  # fmt: skip
    run_profile(sweep, base / "profile")
    cfg, cands = build_config([base / "profile"])
    chosen = sorted((c for c in cands if c["id"].split("/", 1)[1] in WANTED), key=lambda c: (c["latency_ms"], c["id"]))
    assert len(chosen) == len(WANTED)
    for i, p in enumerate(chosen):
        p["energy_j"] = None if i == 1 else round(0.05 * (i + 1), 3)
    cfg["frontier"] = chosen
    return write_config(cfg, base / "cfg.json")


@pytest.fixture(scope="module")
def built(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("c-build")
    res = runner.invoke(app, ["build-c", str(config), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def run_c(built, config, questions, *args):
    exe = str(built / "bin" / "edgetts-answer")
    proc = subprocess.run([exe, "--config", str(config), "--threads", "1", *args], input="\n".join(questions) + "\n",
                          capture_output=True, text=True, errors="replace")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def python_runs(point, frontier, questions, seed):
    """(trace, rows' tokens) per question from the Python strategies, on an engine sized like the C runtime's."""
    max_n, max_budget = max(p["n"] for p in frontier), max(p["budget"] for p in frontier)
    spec = point_spec(point).with_options(threads=1)
    engine, family = open_engine(spec, max_rows=max_n, max_tokens=max_budget + RunConfig().answer_tokens)
    captured = []
    sample = engine.sample

    def capture(*a, **k):
        res = sample(*a, **k)
        captured.extend(list(r.tokens) for r in res.rows)
        return res

    engine.sample = capture
    out = []
    try:
        for q in questions:
            captured.clear()
            cfg = RunConfig(n=point["n"], budget=point["budget"], sampling=SamplingParams(seed=seed))
            out.append((create(point["strategy"], engine, family, cfg).run(q), list(captured)))
    finally:
        engine.close()
    return out


@pytest.mark.parametrize(("strategy", "limit"), [("majority/n4/b32", 200), ("esc/n8/b32", 200), ("single/n1/b32", 50),
                                                 ("first-finish/n4/b32", 50), ("adaptive/n8/b16", 50),
                                                 ("weighted/n4/b32", 50)])  # fmt: skip
def test_rows_are_token_for_token_the_python_rows(built, config, strategy, limit):
    frontier = load_config(config)["frontier"]
    point = next(p for p in frontier if p["id"].endswith(strategy))
    questions = [e.question for e in load_dataset("arith", limit=limit, seed=0)]
    c_out = run_c(built, config, questions, "--point", point["id"], "--rows", "--seed", str(SEED))
    py_out = python_runs(point, frontier, questions, SEED)
    rows = bad_rows = bad_answers = 0
    for c, (trace, tokens) in zip(c_out, py_out, strict=True):
        assert "error" not in c, c
        rows += len(tokens)
        bad_rows += sum(a != b["tokens"] for a, b in zip(tokens, c["rows"])) + abs(len(tokens) - len(c["rows"]))
        bad_answers += c["answer"] != trace.answer
        if not bad_rows:
            assert list(c["votes"]) == list(trace.votes)  # same answers, in the same order
            assert list(c["votes"].values()) == pytest.approx(list(trace.votes.values()), rel=1e-8)
            assert (c["early_stop"], c["generated_tokens"], c["rows_used"]) == (
                trace.early_stop, trace.generated_tokens, trace.rows_used)
            for cr, pr in zip(c["rows"], trace.rows):
                assert (cr["answer"], cr["finish_reason"], cr["thinking_tokens"], cr["answer_tokens"],
                        cr["forced_answer"], cr["text"]) == (pr.answer, pr.finish_reason, pr.thinking_tokens,
                                                             pr.answer_tokens, pr.forced_answer, pr.text)  # fmt: skip
                if pr.confidence is not None:  # weighted: numpy's float32 exp is not the C library's
                    assert cr["confidence"] == pytest.approx(pr.confidence, rel=1e-6, abs=1e-9)
    assert (bad_rows, bad_answers) == (0, 0), f"{bad_rows} of {rows} rows and {bad_answers} answers differ"


def test_rows_match_edgetts_run_config(built, config):
    """``edgetts run --config`` sizes its engine for the chosen point alone; on the tiny model the rows agree too."""
    from edgetts.runtime.oneshot import answer

    questions = [e.question for e in load_dataset("arith", limit=30, seed=1)]
    c_out = run_c(built, config, questions, "--deadline-ms", "1e9", "--rows", "--seed", str(SEED))
    for q, c in zip(questions, c_out, strict=True):
        trace = answer(q, config=str(config), deadline_ms=1e9, seed=SEED, threads=1).trace
        assert c["point_id"] is not None and c["answer"] == trace.answer
        assert [r["text"] for r in c["rows"]] == [r["text"] for r in trace.to_dict(with_text=True)["rows"]]


def test_policy_agrees_with_python_also_after_observations(built, config, tmp_path):
    exe = build_driver(built, tmp_path / "policy")
    policy = Policy.load(config)
    front = policy.frontier
    rng = random.Random(0)
    lines, expected = [], []
    price, changed = 0.0, 0
    for k in range(1000):
        if k % 100 == 50:  # a price on compute (accuracy per ms): none, small, large, and the extremes
            # (price x ms overflows to inf for every point; a subnormal price): each kind twice
            price = [0.0, rng.uniform(0, 0.002), rng.uniform(0.002, 0.05), 1e300, 5e-324][k // 100 % 5]
            lines.append(f"p {price!r} 0")
            expected.append(repr(price))
        if k % 50 == 25:  # the same observations on both sides
            for _ in range(3):
                i = rng.randrange(len(front))  # around each point's median: the factor moves both ways
                ms = rng.uniform(0.3, 3) * front[i]["latency_quantiles_ms"]["p50"]
                policy.observe(front[i]["id"], ms)
                lines.append(f"o {i} {ms!r}")
                expected.append(repr(policy.slowdown))
        if rng.random() < 0.3:  # on a point's latency exactly: the boundary of "fits"
            deadline = front[rng.randrange(len(front))]["latency_ms"]
        else:
            deadline = rng.uniform(0, 2 * front[-1]["latency_ms"])
        energy = rng.choice([0.0, -1.0, rng.uniform(0, 0.4), front[rng.randrange(len(front))]["energy_j"] or 0.0])
        sel = policy.select(deadline, energy_j=energy, price=price)
        changed += sel.index != policy.select(deadline, energy_j=energy).index
        lines.append(f"s {deadline!r} {energy!r}")
        expected.append(f"{sel.index} {int(sel.miss)}")
    got = drive(exe, lines)
    for e, g in zip(expected, got, strict=True):
        assert (float(e) == float(g)) if " " not in e else e == g
    assert changed > 20  # the price moved the choice in many cases: the rule was compared, not only price 0


def test_answer_stream_and_deadline_choice(built, config):
    questions = [e.question for e in load_dataset("arith", limit=5, seed=0)]
    policy = Policy.load(config)
    front = policy.frontier
    out = run_c(built, config, questions, "--deadline-ms", str(front[2]["latency_ms"] * 1.0001), "--seed", "1")
    first = policy.select(front[2]["latency_ms"] * 1.0001)
    assert out[0]["point_id"] == first.point["id"]
    for o in out:
        assert set(o) >= {"answer", "point_id", "strategy", "n", "budget", "latency_ms", "deadline_met",
                          "generated_tokens"}  # fmt: skip
        assert isinstance(o["deadline_met"], bool) and o["generated_tokens"] > 0
    best = run_c(built, config, questions[:1])[0]
    assert best["point_id"] == max(front, key=lambda p: p["accuracy"])["id"] and best["deadline_met"] is None
    # a line that is not text is refused as Python refuses it, and the stream goes on
    proc = subprocess.run([str(built / "bin" / "edgetts-answer"), "--config", str(config)],
                          input=questions[0].encode() + b"\xff\xfe\n" + questions[1].encode() + b"\n",
                          capture_output=True)  # fmt: skip
    bad, good = (json.loads(line) for line in proc.stdout.decode().splitlines())
    assert bad == {"error": "the question is not valid UTF-8 text", "status": "bad argument"}
    assert good["answer"] is not None or good["generated_tokens"] > 0
    # a NUL ends a C string: the rest of the line would go unread, so both runtimes refuse the line
    lines = questions[0].encode() + b"\0 and then 9*9\n" + questions[1].encode() + b"\n"
    proc = subprocess.run([str(built / "bin" / "edgetts-answer"), "--config", str(config)], input=lines,
                          capture_output=True)  # fmt: skip
    bad, good = (json.loads(line) for line in proc.stdout.decode().splitlines())
    assert bad == {"error": "the question holds a NUL character", "status": "bad argument"} and "answer" in good
    # no line at all (an empty file, or standard input closed) is said, as run - says it, not an empty success
    for given in ({"stdin": subprocess.DEVNULL}, {"input": ""}):
        proc = subprocess.run([str(built / "bin" / "edgetts-answer"), "--config", str(config)], capture_output=True,
                              text=True, **given)  # fmt: skip
        assert proc.returncode == 2 and proc.stdout == "", given
        assert proc.stderr.endswith("error: no question on standard input (one per line)\n")
    res = runner.invoke(app, ["run", "-", "--config", str(config), "--deadline-ms", "1e9", "--json", "--threads", "1"],
                        input=lines)  # fmt: skip
    said = [json.loads(line) for line in res.stdout.splitlines()]
    assert said[0] == {"line": 1, "error": "the question holds a NUL character"} and "answer" in said[1]


def test_no_deadline_is_the_same_answer_on_both_runtimes_in_strict_json(built, config):
    """A deadline that never binds (inf, or C's EDGETTS_NO_DEADLINE) picks the most accurate point on both
    runtimes, and both report no deadline: no Infinity in the JSON, no "deadline met" for what had none."""
    from edgetts.timing import NO_DEADLINE_MS

    header = (built / "include" / "edgetts.h").read_text()
    assert float(header.split("#define EDGETTS_NO_DEADLINE ")[1].split()[0]) == NO_DEADLINE_MS

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    question = load_dataset("arith", limit=1, seed=4)[0].question
    c = run_c(built, config, [question], "--seed", "2")[0]
    for deadline in ("inf", "1e300"):
        res = runner.invoke(app, ["run", question, "--config", str(config), "--deadline-ms", deadline, "--json",
                                  "--seed", "2", "--threads", "1"])  # fmt: skip
        assert res.exit_code == 0, res.output
        py = strict(res.output.strip().splitlines()[-1])
        assert (py["deadline_ms"], py["deadline_met"], c["deadline_met"]) == (None, None, None)
        assert (py["answer"], py["generated_tokens"]) == (c["answer"], c["generated_tokens"])


def test_command_line_errors(built, config, tmp_path):
    exe = str(built / "bin" / "edgetts-answer")
    other = tmp_path / "other.json"
    other.write_text(config.read_text() + "\n")
    for args in (["--config", str(other)], ["--deadline-ms", "0"], ["--point", "nope"], ["--seed"]):
        proc = subprocess.run([exe, *args], input="", capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (args, proc.stderr)
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True)  # every option explained
    options = ("--config", "--deadline-ms", "--energy-j", "--price", "--mean-ms", "--seed", "--model-dir",
               "--threads", "--gpu-layers", "--point", "--rows")  # fmt: skip
    assert helped.returncode == 0 and all(f"\n  {o} " in helped.stdout for o in options), helped.stdout
    res = runner.invoke(app, ["build-c", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output
    cfg = json.loads(config.read_text())
    cfg["frontier"][0]["strategy"] = "best-of-n"
    bad = tmp_path / "best-of-n.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match="best-of-n"):
        build_c(bad, tmp_path / "o")
    cfg = json.loads(config.read_text())
    cfg["frontier"][0]["engine_options"] = {**cfg["frontier"][0].get("engine_options", {}), "kv_unified": False}
    bad = tmp_path / "split-cache.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match=r"frontier\[0\].*kv_unified"):
        build_c(bad, tmp_path / "o")
    cfg = json.loads(config.read_text())
    cfg["frontier"][1]["profiled_with"] = {**cfg["frontier"][1]["profiled_with"], "threads": 2}
    mixed = tmp_path / "mixed-settings.json"
    mixed.write_text(json.dumps(cfg))
    res = runner.invoke(app, ["build-c", str(mixed), "--out", str(tmp_path / "o")])  # as run --config and serve
    assert res.exit_code == 2 and "profiled under 2 settings" in res.output and not (tmp_path / "o").exists()
    cfg = json.loads(config.read_text())
    cfg["frontier"][0]["engine_options"] = {**cfg["frontier"][0].get("engine_options", {}), "n_ctx": 8}
    small = tmp_path / "small-context.json"
    small.write_text(json.dumps(cfg))
    build_c(small, tmp_path / "small")
    proc = subprocess.run([str(tmp_path / "small" / "bin" / "edgetts-answer"), "--point", "0"], input="2+3\n",
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "n_ctx must be at least 256" in proc.stderr, proc.stderr  # not an abort
    for args in (["--threads", "1e12"], ["--threads", "0"], ["--gpu-layers", "-2"], ["--gpu-layers", "2.5"],
                 ["--n", "1e12"], ["--budget", "nan"], ["--n", "-3"], ["--energy-j", "nan"], ["--energy-j", "-1"],
                 ["--seed", "-1"], ["--seed", "3.5"], ["--seed", "4294967296"], ["--mean-ms", "0"],
                 ["--mean-ms", "inf"], ["--mean-ms", "nan"], ["--price", "-1"]):  # fmt: skip
        proc = subprocess.run([exe, *args], input="", capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {args[0]} must be"), (args, proc.stderr)
    for args, said in ((["--bogus"], "unknown option --bogus"), (["--bogus", "1"], "unknown option --bogus"),
                       (["--price"], "--price needs a value"),
                       (["--threads", "100000"], "threads must be from 0 (the default) to 512")):  # fmt: skip
        proc = subprocess.run([exe, *args], input="", capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {said}"), (args, proc.stderr)
    # a one-row point with n above 1 ran one row and said n=8, as the server did; both refuse it now
    single = next(i for i, p in enumerate(json.loads(config.read_text())["frontier"]) if p["strategy"] == "single")
    proc = subprocess.run([exe, "--point", str(single), "--n", "8"], input="2+3\n", capture_output=True, text=True)
    out = json.loads(proc.stdout.splitlines()[0])
    assert out["status"] == "bad argument" and "runs single, one row; n=8 would be ignored" in out["error"]


def test_the_callers_settings_run_and_a_difference_is_said(built, config):
    """The points were profiled on one thread; edgetts-answer runs what it is told and says so."""
    exe = str(built / "bin" / "edgetts-answer")

    def answer(*args):
        return subprocess.run([exe, *args], input="Evaluate left to right: 8*4-3\n", capture_output=True, text=True)

    same = answer("--threads", "1")
    assert same.returncode == 0 and "note:" not in same.stderr and json.loads(same.stdout)["answer"] is not None
    other = answer("--threads", "2")
    assert other.returncode == 0 and json.loads(other.stdout)["answer"] is not None
    notes = [ln for ln in other.stderr.splitlines() if ln.startswith("note:")]
    assert notes and all("profiled with threads=1, gpu_layers=0; running with threads=2" in n for n in notes)
    if not offload.supports_offload():  # asked of a CPU-only build: runs on the CPU, and says so once
        gpu = answer("--threads", "1", "--gpu-layers", "99")
        assert gpu.returncode == 0 and gpu.stderr.count("warning: gpu_layers=99") == 1


def test_sanitizers_on_200_calls_with_bad_inputs(config, tmp_path, tiny_gguf):
    from pathlib import Path

    san = tmp_path / "san"
    build_c(config, san, sanitize=True)
    exe = tmp_path / "stress"
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]
    subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", *flags, f"-I{san / 'include'}",
                    "-o", str(exe), str(Path(__file__).parent / "c_runtime_stress.c"), f"-L{san / 'lib'}", "-ledgetts",
                    f"-Wl,-rpath,{san / 'lib'}", "-lpthread", "-lm"], check=True)  # fmt: skip
    name = Path(tiny_gguf).name
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / name).write_bytes(b"GGUF" + random.Random(0).randbytes(4096))
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / name).write_bytes(Path(tiny_gguf).read_bytes()[:200_000])
    questions = tmp_path / "q.txt"
    questions.write_text("".join(e.question + "\n" for e in load_dataset("arith", limit=20, seed=0)))
    proc = subprocess.run([str(exe), str(config), str(tmp_path / "corrupt"), str(tmp_path / "truncated"),
                           str(questions)], capture_output=True, text=True)  # fmt: skip
    report = [ln for ln in proc.stderr.splitlines() if "Sanitizer" in ln or "runtime error" in ln]
    assert proc.returncode == 0 and not report, proc.stdout[-2000:] + proc.stderr[-4000:]


EXTRACT_DRIVER = r"""
#include <stdio.h>
#include <string.h>
int ett_extract_answer(const char *text, const char *think_start, const char *think_end, char *out, size_t cap);
int main(void) {
    static char text[1 << 16], out[256];
    size_t n;
    while (fgets(text, sizeof text, stdin) != NULL) {  /* one test per line, "\n" written as \x01 */
        for (n = 0; text[n]; n++) text[n] = text[n] == '\n' ? 0 : (text[n] == 1 ? '\n' : text[n]);
        if (ett_extract_answer(text, "<think>", "</think>", out, sizeof out)) {
            for (n = 0; out[n]; n++) out[n] = out[n] == '\n' ? 1 : out[n];
            printf("=%s\n", out);
        }
        else printf("-\n");
    }
    return 0;
}
"""

TEXTS = [
    "12+7=19\n19*3=57\n</think>\nThe answer is 57", "x</think>#### 42\nmore", "####\n 7", "#### \n", "#####5",
    "\\boxed{1{2}3} and \\boxed{9}", "\\fbox{5", "\\boxed{ }", "The ANSWER: $-3.5.", "so the answer is x^2 here",
    "answer is   \n12", "1,234 and 5/6", "-.5 then .25", "<think>never closed 12", "a</think>b</think>c 3.",
    "the answer is 42 apples.", "Answer: :$ 7$", "nothing here", "1.2.3", "The answer is -", "answeris5",
    "----5", "3/0", "x" * 300 + " 77", "#### " + "9" * 250,
]  # fmt: skip


def test_answer_extraction_matches_python(built, tmp_path):
    from edgetts.tasks.grading import extract_answer

    exe = tmp_path / "extract"
    subprocess.run([CC, "-std=c99", "-o", str(exe), "-x", "c", "-", f"-L{built / 'lib'}", "-ledgetts",
                    f"-Wl,-rpath,{built / 'lib'}"], input=EXTRACT_DRIVER, text=True, check=True)  # fmt: skip
    rng = random.Random(0)
    parts = ["answer", "ANSWER", " is ", "is", ":", "####", "#", "\\boxed{", "\\fbox{", "{", "}", "</think>",
             "<think>", "$", "\n", " ", "-", ".", ",", "/", "7", "42", "0.5", "x"]  # fmt: skip
    texts = TEXTS + ["".join(rng.choice(parts) for _ in range(rng.randrange(1, 30))) for _ in range(2000)]
    feed = "".join(t.replace("\n", "\x01") + "\n" for t in texts)
    got = subprocess.run([str(exe)], input=feed, capture_output=True, text=True, check=True).stdout.splitlines()
    for t, g in zip(texts, got, strict=True):
        want = extract_answer(t)
        assert g == ("-" if want is None else "=" + want.replace("\n", "\x01")), t


def test_build_c_never_overwrites_a_users_files(built, config, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    res = runner.invoke(app, ["build-c", str(config), "--out", str(notes)])
    assert res.exit_code == 2 and res.stderr.startswith("error: --out") and "is a file" in res.stderr
    assert notes.read_text() == "mine"
    app_dir = tmp_path / "app"
    (app_dir / "include").mkdir(parents=True)
    (app_dir / "src").mkdir()
    (app_dir / "obj").mkdir()
    (app_dir / "include" / "edgetts.h").write_text("/* my own header */\n")
    (app_dir / "src" / "frontier.c").write_text("int mine;\n")
    (app_dir / "obj" / "keep.o").write_text("mine")
    before = {p: p.read_bytes() for p in app_dir.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["build-c", str(config), "--out", str(app_dir)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "edgetts.h exists and was not written by edgetts" in lines[0]
    assert {p: p.read_bytes() for p in app_dir.rglob("*") if p.is_file()} == before
    (app_dir / "include" / "edgetts.h").unlink()  # its own src/frontier.c still stops the build
    assert runner.invoke(app, ["build-c", str(config), "--out", str(app_dir)]).exit_code == 2
    # A folder build-c wrote is rebuilt in place; a folder of the user's beside its outputs is left alone.
    (built / "obj").mkdir(exist_ok=True)
    (built / "obj" / "keep.o").write_text("mine")
    res = runner.invoke(app, ["build-c", str(config), "--out", str(built)])
    assert res.exit_code == 0, res.output
    assert (built / "obj" / "keep.o").read_text() == "mine"


def test_the_constants_c_shares_with_python_come_from_python(built):
    from edgetts.engines.spec import FORCED_SLACK, MAX_THREADS, PROMPT_RESERVE
    from edgetts.runtime.pricing import CEILING, MeanBudget
    from edgetts.timing import ANSWER_SAFETY, ANSWER_STEPS

    text = (built / "src" / "edgetts_constants.h").read_text()
    values = dict(line.split()[1:3] for line in text.splitlines() if line.startswith("#define ETT_"))
    assert values == {"ETT_ANSWER_TOKENS": str(RunConfig().answer_tokens), "ETT_ANSWER_STEPS": str(ANSWER_STEPS),
                      "ETT_ANSWER_SAFETY": repr(float(ANSWER_SAFETY)), "ETT_PROMPT_RESERVE": str(PROMPT_RESERVE),
                      "ETT_FORCED_SLACK": str(FORCED_SLACK), "ETT_RUNS": str(Policy.RUNS),
                      "ETT_MAX_THREADS": str(MAX_THREADS), "ETT_PRICE_FLOOR": repr(MeanBudget.FLOOR),
                      "ETT_PRICE_STEP": repr(MeanBudget.STEP), "ETT_PRICE_WINDOW": str(MeanBudget.WINDOW),
                      "ETT_PRICE_CEILING": repr(float(CEILING))}  # fmt: skip
    assert "#define ETT_" not in (Path(__file__).parent.parent / "edgetts" / "native" / "internal.h").read_text()


@pytest.mark.parametrize(("strategy", "deadline_ms"),
                         [("majority/n4/b32", 14), ("esc/n8/b32", 18), ("single/n1/b32", 9),
                          ("majority/n4/b32", 28)])  # fmt: skip
def test_the_deadline_branch_forces_answers_at_the_same_steps(built, config, monkeypatch, strategy, deadline_ms):
    """With a clock that advances a fixed step per decode (EDGETTS_STEP_CLOCK_MS in C, the same clock
    patched into Python), a deadline that cuts the reasoning forces the answers, or stops the rows,
    at the same steps on both runtimes: rows token for token equal, finish reasons included."""
    import time as time_module

    frontier = load_config(config)["frontier"]
    point = next(p for p in frontier if p["id"].endswith(strategy))
    questions = [e.question for e in load_dataset("arith", limit=12, seed=2)]
    monkeypatch.setenv("EDGETTS_STEP_CLOCK_MS", "1")
    c_out = run_c(built, config, questions, "--point", point["id"], "--rows", "--seed", str(SEED), "--deadline-ms",
                  str(deadline_ms))  # fmt: skip
    max_n, max_budget = max(p["n"] for p in frontier), max(p["budget"] for p in frontier)
    engine, family = open_engine(point_spec(point).with_options(threads=1), max_rows=max_n,
                                 max_tokens=max_budget + RunConfig().answer_tokens)  # fmt: skip
    decodes = [0]
    real_decode = engine._decode

    def counted(entries):
        status = real_decode(entries)
        decodes[0] += 1
        return status

    engine._decode = counted
    monkeypatch.setattr(time_module, "perf_counter", lambda: decodes[0] * 0.001)
    prefixed = []  # rows that ended their thinking by themselves too late for an answer of their own
    real_force = Control.force

    def force(ctl, row, text, extra_tokens=0):
        prefixed.extend([row] if text == family.answer_prefix else [])
        real_force(ctl, row, text, extra_tokens)

    monkeypatch.setattr(Control, "force", force)
    try:
        forced = cut = 0
        for q, c in zip(questions, c_out, strict=True):
            cfg = RunConfig(n=point["n"], budget=point["budget"], deadline_ms=deadline_ms,
                            sampling=SamplingParams(seed=SEED))  # fmt: skip
            trace = create(point["strategy"], engine, family, cfg).run(q)
            assert "error" not in c, c
            py_rows = [(r.finish_reason, r.forced_answer, r.thinking_tokens, r.answer_tokens, r.text)
                       for r in trace.rows]  # fmt: skip
            c_rows = [(r["finish_reason"], r["forced_answer"], r["thinking_tokens"], r["answer_tokens"], r["text"])
                      for r in c["rows"]]  # fmt: skip
            assert c_rows == py_rows and c["answer"] == trace.answer and c["early_stop"] == trace.early_stop
            forced += sum(r.forced_answer for r in trace.rows)
            cut += sum(r.finish_reason == "deadline" for r in trace.rows)
    finally:
        engine.close()
    assert forced + cut > 0  # the deadline did bind: this compared the deadline branch, not free runs
    if deadline_ms == 28:  # and here rows that ended their thinking late were given the answer prefix, alike
        assert prefixed
