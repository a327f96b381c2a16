"""The exported C header: strict builds of programs using any part of it, as C99 and as C++.

Three programs each use a different part of the header (only ``edgetts_select``, only the vote
helper, everything including the point data); each is built with every available compiler at its
strictest usual flags and run.  ``-Wunused-const-variable=2`` also checks the data arrays, which
GCC otherwise forgives in headers.
"""

import random
import shutil
import subprocess

import pytest

from edgetts.export.c_header import export_c, header
from edgetts.pareto.config import SCHEMA, ParetoError
from edgetts.runtime import Policy

C99 = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
CXX17 = ["-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic"]
BUILDS = {
    "gcc-c99": ("gcc", C99),
    "gcc-c99-unused-data": ("gcc", [*C99, "-Wunused-const-variable=2"]),
    "g++-c++17": ("g++", CXX17),
    "clang-c99": ("clang", C99),
    "clang++-c++17": ("clang++", CXX17),
}

SELECT_ONLY = r"""
#include <stdio.h>
#include "edgetts_policy.h"
int main(void) {
    double d, e;
    while (scanf("%lf %lf", &d, &e) == 2) printf("%d\n", edgetts_select(d, e));
    return 0;
}
"""

SELECT_PRICED = r"""
#include <stdio.h>
#include "edgetts_policy.h"
int main(void) {
    double d, e, p;
    while (scanf("%lf %lf %lf", &d, &e, &p) == 3) printf("%d\n", edgetts_select_priced(d, e, p));
    return 0;
}
"""

VOTE_ONLY = r"""
#include <stdio.h>
#include "edgetts_policy.h"
int main(void) {
    const char *votes[] = {"7", NULL, "8", "8", "7", NULL};
    const char *none[] = {NULL, NULL};
    const char *one[] = {"42"};
    printf("%s\n", edgetts_majority(votes, 6));
    printf("%s\n", edgetts_majority(none, 2) == NULL ? "null" : "bad");
    printf("%s\n", edgetts_majority(one, 1));
    printf("%s\n", edgetts_majority(votes, 0) == NULL ? "null" : "bad");
    return 0;
}
"""

EVERYTHING = r"""
#include <stdio.h>
#include "edgetts_policy.h"
int main(void) {
    int i;
    const char *votes[] = {"a", "b", "b"};
    for (i = 0; i < EDGETTS_N_POINTS; i++) {
        const edgetts_point *p = &edgetts_points[i];
        printf("%s\t%s\t%s\t%s\t%d\t%d\t%.17g\t%.17g\t%.17g\t%.17g\t%s\t%.17g\n", p->id,
               p->engine ? p->engine : "(null)", p->model, p->strategy, p->n, p->budget, p->latency_ms,
               p->accuracy, p->energy_j, p->memory_mb, edgetts_ids[i], edgetts_latency_ms[i]);
    }
    printf("%d %s\n", edgetts_select(1e9, 0.0), edgetts_majority(votes, 3));
    return 0;
}
"""


def _config():
    points = [
        ("q4/single/n1/b16", "single", 1, 16, 12.5, 0.30, 0.2, 800),
        ("q4/majority/n4/b48", "majority", 4, 48, 30.0, 0.45, 0.9, 900),
        ("q8/esc/n8/b48", "esc", 8, 48, 55.25, 0.52, None, None),
        ("q8/majority/n8/b96", "majority", 8, 96, 120.0, 0.61, 1.7, 1200),
        ("q8/ffs/n4/b96", "ffs", 4, 96, 240.0, 0.66, 0.4, 1250),
    ]
    front = [
        {"id": i, "model": i.split("/")[0], "artifact": f"/models/{i.split('/')[0]}.gguf", "engine": "llama.cpp",
         "strategy": s, "n": n, "budget": b, "latency_ms": lat, "latency_quantiles_ms": {"p95": lat},
         "accuracy": acc, "accuracy_ci95": [acc - 0.1, acc + 0.1], "energy_j": e, "memory_mb": m}
        for i, s, n, b, lat, acc, e, m in points
    ]  # fmt: skip
    front[1]["engine"] = "onnx-genai"
    # A structured engine spec may ride along; the header reads the engine name only.
    front[2]["engine_spec"] = {"name": "llama.cpp", "artifact": "/models/q8.gguf", "options": {"n_ctx": 2048}}
    return {"schema": SCHEMA, "device": {"cpu": "test"}, "task": {"dataset": "arith"},
            "objective": {"maximize": "accuracy", "latency_quantile": "p95"}, "frontier": front}  # fmt: skip


def _build(name, src, tmp_path, header_name="edgetts_policy.h"):
    compiler, flags = BUILDS[name]
    path = shutil.which(compiler)
    if path is None:
        pytest.skip(f"{compiler} is not installed")
    (tmp_path / "main.c").write_text(src.replace("edgetts_policy.h", header_name))
    exe = tmp_path / "prog"
    r = subprocess.run([path, *flags, "-o", str(exe), "main.c"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, f"{name} failed:\n{r.stderr}"
    return exe


def _run(exe, stdin=""):
    return subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("build", list(BUILDS))
def test_a_program_using_only_select_builds_and_matches_the_policy(build, tmp_path):
    config = _config()
    export_c(config, tmp_path / "edgetts_policy.h")
    exe = _build(build, SELECT_ONLY, tmp_path)
    rng = random.Random(1)
    queries = [(rng.uniform(0, 300), rng.choice([0.0, -1.0, rng.uniform(0, 2.0)])) for _ in range(300)]
    queries += [(p["latency_ms"], 0.0) for p in config["frontier"]]  # a deadline exactly at a point fits it
    out = _run(exe, "".join(f"{d!r} {e!r}\n" for d, e in queries))
    pol = Policy(config)
    assert [int(x) for x in out] == [pol.select(d, energy_j=e).index for d, e in queries]


@pytest.mark.parametrize("build", list(BUILDS))
def test_the_priced_select_matches_the_policy_under_a_price(build, tmp_path):
    config = _config()
    export_c(config, tmp_path / "edgetts_policy.h")
    exe = _build(build, SELECT_PRICED, tmp_path)
    rng = random.Random(2)
    prices = [0.0, 5e-324, 1e300] + [rng.uniform(0, 0.01) for _ in range(20)]
    queries = [(rng.uniform(0, 300), rng.choice([0.0, rng.uniform(0, 2.0)]), rng.choice(prices)) for _ in range(400)]
    out = _run(exe, "".join(f"{d!r} {e!r} {p!r}\n" for d, e, p in queries))
    pol = Policy(config)
    expected = [pol.select(d, energy_j=e, price=p).index for d, e, p in queries]
    assert [int(x) for x in out] == expected
    assert sum(pol.select(d, energy_j=e).index != x for (d, e, _), x in zip(queries, expected)) > 20  # priced


@pytest.mark.parametrize("build", list(BUILDS))
def test_a_program_using_only_the_vote_helper_builds(build, tmp_path):
    export_c(_config(), tmp_path / "edgetts_policy.h")
    assert _run(_build(build, VOTE_ONLY, tmp_path)) == ["7", "null", "42", "null"]  # 2-2 tie: first seen


@pytest.mark.parametrize("build", list(BUILDS))
def test_points_carry_their_settings_as_data(build, tmp_path):
    config = _config()
    export_c(config, tmp_path / "edgetts_policy.h")
    out = _run(_build(build, EVERYTHING, tmp_path))
    front = config["frontier"]
    assert len(out) == len(front) + 1
    for line, p in zip(out, front):
        id_, engine, model, strategy, n, budget, lat, acc, energy, memory, flat_id, flat_lat = line.split("\t")
        assert (id_, engine, model, strategy) == (p["id"], p["engine"], p["model"], p["strategy"])
        assert (int(n), int(budget)) == (p["n"], p["budget"])
        assert (float(lat), float(acc)) == (p["latency_ms"], p["accuracy"])
        assert float(energy) == (-1.0 if p["energy_j"] is None else p["energy_j"])
        assert float(memory) == (-1.0 if p["memory_mb"] is None else p["memory_mb"])
        assert (flat_id, float(flat_lat)) == (p["id"], p["latency_ms"])
    assert out[-1] == f"{len(front) - 1} b"


HEX_IDS = r"""
#include <stdio.h>
#include "edgetts_policy.h"
int main(void) {
    int i;
    const unsigned char *s;
    for (i = 0; i < EDGETTS_N_POINTS; i++) {
        for (s = (const unsigned char *)edgetts_points[i].id; *s; s++) printf("%02x", *s);
        printf(" ");
        for (s = (const unsigned char *)edgetts_points[i].strategy; *s; s++) printf("%02x", *s);
        printf("\n");
    }
    return 0;
}
"""


@pytest.mark.parametrize("build", ["gcc-c99", "g++-c++17"])
def test_any_text_becomes_a_valid_c_string(build, tmp_path):
    config = _config()
    odd = ['quote"back\\slash', "trigraph??/x??=", "new\nline\ttab\x017", "ünïcode/数学", "*/ /* comment"]
    for p, text in zip(config["frontier"], odd):
        p["id"] = text
        p["strategy"] = text[::-1]
    config["task"]["dataset"] = "x */ y ??/"
    export_c(config, tmp_path / "2-policy.h")  # a file name that starts with a digit still gives a valid guard
    out = _run(_build(build, HEX_IDS, tmp_path, header_name="2-policy.h"))
    assert out == [f"{p['id'].encode().hex()} {p['strategy'].encode().hex()}" for p in config["frontier"]]


def test_header_rejects_what_c_cannot_hold():
    config = _config()
    config["frontier"][0]["energy_j"] = float("inf")
    with pytest.raises(ParetoError, match=r"frontier\[0\]\.energy_j"):
        header(config)
