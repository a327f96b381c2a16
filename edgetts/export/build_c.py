"""``edgetts build-c``: the runtime in C (``libedgetts``) with a Pareto config's frontier compiled in.

How a build goes:

1. the config is loaded and every frontier point is checked: the C runtime runs llama.cpp
   points (GGUF files) on one unified cache (no ``kv_unified: false``) with the strategies it
   has (single, majority, esc, adaptive, first-finish, and weighted with its default options);
   a config with any other point is refused, naming the point, since skipping it would make
   the C policy choose differently from the Python one;
2. per point, everything C needs is written into a generated ``frontier.c``: the resolved
   model path, strategy, n, budget, profiled latency, accuracy, energy and memory, the engine
   options, the settings it was profiled with (``profiled_with``: compared with the runtime's
   own threads and GPU layers, never applied), the reasoning family's delimiters and answer
   prefix, and the prompt, rendered by
   :func:`edgetts.models.families.build_prompt` around a placeholder and split there, so C
   only concatenates prefix, question and suffix (no Jinja in C); also the FNV-1a 64 digest of
   the config file's bytes, which ``edgetts-answer --config`` checks;
3. the C sources shipped in ``edgetts/native`` are compiled with the C compiler (``$CC``, else
   ``cc``, ``gcc`` or ``clang``) against the ``llama.h`` and ``libllama`` that llama-cpp-python installed (no
   download), into ``DIR/include/edgetts.h``, ``DIR/lib/libedgetts.so``, ``DIR/lib/libedgetts.a``
   and ``DIR/bin/edgetts-answer``, with rpaths to the library folders so the program runs as is.

``sanitize=True`` builds with ``-fsanitize=address,undefined`` (for the test suite).  The
generated ``DIR/src/frontier.c`` and the native ``CMakeLists.txt`` build the same library
against another llama.cpp (a CUDA build on a Jetson).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgetts.engines.base import EngineError
from edgetts.engines.spec import EngineSpec
from edgetts.export.c_header import _c_string_or_null as _c
from edgetts.export.c_header import _comment, _num
from edgetts.models import ModelNotFound, resolve_model
from edgetts.models.families import FAMILIES, build_prompt, guess_family
from edgetts.outputs import OutputError, check_output, contains
from edgetts.pareto.config import ParetoError, load_config, one_setting, point_spec, profiled_with
from edgetts.strategies import STRATEGIES

NATIVE = Path(__file__).resolve().parent.parent / "native"
SOURCES = ("engine.c", "extract.c", "strategies.c", "pricing.c", "runtime.c")
C_STRATEGIES = ("single", "majority", "esc", "adaptive", "first-finish", "weighted")
PLACEHOLDER = "\x00QUESTION\x00"
CFLAGS = ["-std=c99", "-O2", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-pedantic"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]


class BuildError(ValueError):
    """A config the C runtime cannot serve, or a build that failed; the message says which."""


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def llama_dirs() -> tuple[Path, Path]:
    """(folder of llama.h, folder of libllama) of the installed llama-cpp-python."""
    import llama_cpp

    pkg = Path(llama_cpp.__file__).resolve().parent
    lib = pkg / "lib"
    for inc in (pkg.parent / "include", pkg / "include"):
        if (inc / "llama.h").is_file():
            break
    else:
        raise BuildError(f"llama.h not found next to llama-cpp-python ({pkg}); pass --llama-include")
    if not any(lib.glob("libllama.*")):
        raise BuildError(f"libllama not found in {lib}; pass --llama-lib")
    return inc, lib


def _gguf_meta(path: Path) -> tuple[str | None, str | None]:
    """(general.name, tokenizer.chat_template) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def text(key):
        f = reader.fields.get(key)
        return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8", "replace")

    return text("general.name"), text("tokenizer.chat_template")


def point_c(i: int, p: dict) -> str:
    """The C initializer of frontier point ``i``."""
    where = f"frontier[{i}] ({p['id']})"
    spec: EngineSpec = point_spec(p)
    try:
        spec = spec.resolved()
    except EngineError as e:
        raise BuildError(f"{where}: {e}") from None
    if spec.engine != "llama.cpp":
        raise BuildError(f"{where} runs on {spec.engine!r}; the C runtime runs llama.cpp (GGUF) points only: "
                         "make the config from GGUF profiles, or serve it with edgetts serve")
    if not spec.options.get("kv_unified", True):
        raise BuildError(f"{where} sets kv_unified false; the C runtime runs one unified cache for all rows: "
                         "drop the option, or serve the config with edgetts serve")
    if p["strategy"] not in C_STRATEGIES:
        raise BuildError(f"{where}: strategy {p['strategy']!r} is not in the C runtime ({', '.join(C_STRATEGIES)})")
    if not 1 <= p["n"] <= 64:
        raise BuildError(f"{where}: n must be between 1 and 64 in the C runtime, got {p['n']}")
    try:
        path = resolve_model(spec.artifact).resolve()
    except ModelNotFound as e:
        raise BuildError(f"{where}: {e}") from None
    name, template = _gguf_meta(path)
    o = spec.options
    family = FAMILIES[o["family"]] if o.get("family") in FAMILIES else guess_family(spec.artifact, template, name)
    prompt = build_prompt(family, PLACEHOLDER, template)
    if prompt.count(PLACEHOLDER) != 1:
        raise BuildError(f"{where}: the chat template does not place the question exactly once")
    prefix, suffix = prompt.split(PLACEHOLDER)
    was = profiled_with(p)  # compared with the settings the runtime runs under, never applied
    flash = {None: -1, True: 1, False: 0}[o.get("flash_attn")]

    def num(key, v):
        return _num(v, f"frontier[{i}].{key}")

    fields = [
        "{" + ", ".join([_c(p["id"]), _c(str(path)), _c(p["strategy"]), str(p["n"]), str(p["budget"]),
                         num("latency_ms", p["latency_ms"]), num("accuracy", p["accuracy"]),
                         num("energy_j", p.get("energy_j")), num("memory_mb", p.get("memory_mb"))]) + "}",
        num("p50", (p.get("latency_quantiles_ms") or {}).get("p50") or p["latency_ms"]),
        str(int(isinstance(was.get("threads"), int))), str(int(was.get("threads") or 0)),
        str(int(isinstance(was.get("gpu_layers"), int))), str(int(was.get("gpu_layers") or 0)),
        str(int(o.get("n_ctx") or 0)), str(int(o.get("n_batch") or 0)), str(flash),
        _c(family.think_start), _c(family.think_end), _c(family.answer_prefix), _c(prefix), _c(suffix),
        str(int(STRATEGIES[p["strategy"]].single_row)),  # the Python strategy's own rule, not a name in C
    ]  # fmt: skip
    return "    {" + ", ".join(fields) + "}"


def constants_h() -> str:
    """``edgetts_constants.h``: the values the C runtime shares with the Python one, taken from the
    Python objects that define them, so the two cannot drift apart."""
    from edgetts.engines.spec import FORCED_SLACK, MAX_THREADS, PROMPT_RESERVE
    from edgetts.runtime.policy import Policy
    from edgetts.runtime.pricing import CEILING, MeanBudget
    from edgetts.strategies import RunConfig
    from edgetts.timing import ANSWER_SAFETY, ANSWER_STEPS

    values = {"ANSWER_TOKENS": RunConfig().answer_tokens, "ANSWER_STEPS": ANSWER_STEPS,
              "ANSWER_SAFETY": float(ANSWER_SAFETY), "PROMPT_RESERVE": PROMPT_RESERVE,
              "FORCED_SLACK": FORCED_SLACK, "RUNS": Policy.RUNS, "MAX_THREADS": MAX_THREADS,
              "PRICE_FLOOR": MeanBudget.FLOOR, "PRICE_STEP": MeanBudget.STEP, "PRICE_WINDOW": MeanBudget.WINDOW,
              "PRICE_CEILING": float(CEILING)}  # fmt: skip
    lines = [f"#define ETT_{k} {v!r}" for k, v in values.items()]
    return ("/* Generated by edgetts build-c from the Python runtime's values: do not edit. */\n"
            "#ifndef EDGETTS_CONSTANTS_H\n#define EDGETTS_CONSTANTS_H\n" + "\n".join(lines) + "\n#endif\n")


def frontier_c(config_path: str | Path) -> str:
    """The generated C file holding the frontier of the config at ``config_path``."""
    config = load_config(config_path)
    try:  # as run --config and serve: the library runs under one setting, where the others' latencies do not hold
        one_setting(config, str(config_path))
    except ParetoError as e:
        raise BuildError(str(e)) from None
    points = ",\n".join(point_c(i, p) for i, p in enumerate(config["frontier"]))
    digest = fnv1a64(Path(config_path).read_bytes())
    return (f"/* Generated by edgetts build-c from {_comment(config_path)}: do not edit. */\n"
            '#include "internal.h"\n\n'
            f"const ett_point ett_frontier[] = {{\n{points}\n}};\n"
            f"const int ett_n_frontier = {len(config['frontier'])};\n"
            f'const char ett_config_digest[] = "{digest}";\n')  # fmt: skip


def _cc(cmd: list[str], what: str) -> None:
    """Runs one compile, archive or link step; ``what`` names its output in an error."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
        raise BuildError(f"{cmd[0]} failed ({what}): {first.strip()}")


# What build-c writes under --out, each with the bytes that mark it as build-c's own: a file of
# the same name that lacks them is the user's, and the build is refused before anything is compiled.
OUTPUTS = {
    "include/edgetts.h": contains("libedgetts: test-time scaling on llama.cpp", 4096),
    "src/frontier.c": contains("/* Generated by edgetts build-c", 256),
    "src/edgetts_constants.h": contains("/* Generated by edgetts build-c", 256),
    "lib/libedgetts.so": contains("edgetts_open", 1 << 26),
    "lib/libedgetts.a": contains("edgetts_open", 1 << 26),
    "bin/edgetts-answer": contains("edgetts-answer", 1 << 26),
}


def check_out(out: Path) -> None:
    """Refuse, in one line, an ``--out`` that is a file or holds a file build-c would overwrite that is
    not one it wrote."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file; give a folder (it gets include/, lib/, bin/ and src/)")
    for name, ours in OUTPUTS.items():
        try:
            check_output(out / name, ours)
        except OutputError as e:
            raise BuildError(str(e)) from None


def build_c(config: str | Path, out: str | Path, cc: str | None = None, llama_include: str | Path | None = None,
            llama_lib: str | Path | None = None, sanitize: bool = False) -> dict:  # fmt: skip
    """Build the runtime for ``config`` into ``out``; returns the paths written.

    ``out`` is checked first (:func:`check_out`), so a refused build compiles nothing and changes
    nothing; objects are compiled in a temporary folder, never under ``out``.
    """
    if not Path(config).is_file():
        raise BuildError(f"{config}: no such file")
    check_out(Path(out))
    cc = cc or os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "cc")
    if shutil.which(cc) is None:
        raise BuildError(f"no C compiler {cc!r} on PATH (set CC or pass --cc)")
    inc, lib = llama_dirs() if llama_include is None or llama_lib is None else (None, None)
    inc, lib = Path(llama_include or inc), Path(llama_lib or lib)
    source = frontier_c(config)
    out = Path(out)
    for d in ("include", "lib", "bin", "src"):
        (out / d).mkdir(parents=True, exist_ok=True)
    (out / "src" / "frontier.c").write_text(source)
    (out / "src" / "edgetts_constants.h").write_text(constants_h())
    shutil.copy(NATIVE / "edgetts.h", out / "include" / "edgetts.h")
    with tempfile.TemporaryDirectory(prefix="edgetts-build-") as objdir:
        return _compile(cc, inc, lib, out, Path(objdir), sanitize)


def _compile(cc: str, inc: Path, lib: Path, out: Path, objdir: Path, sanitize: bool) -> dict:
    flags = CFLAGS + (SANITIZE if sanitize else [])
    objs = []
    for src in [*(NATIVE / s for s in SOURCES), out / "src" / "frontier.c"]:
        obj = objdir / (src.stem + ".o")
        _cc([cc, *flags, f"-I{NATIVE}", f"-I{out / 'src'}", "-isystem", str(inc), "-c", "-o", str(obj), str(src)],
            src.name)  # fmt: skip
        objs.append(str(obj))
    static = out / "lib" / "libedgetts.a"
    static.unlink(missing_ok=True)
    ar = shutil.which("ar") or shutil.which("gcc-ar")
    if ar:
        _cc([ar, "rcs", str(static), *objs], static.name)
    shared = out / "lib" / "libedgetts.so"
    link = [f"-L{lib}", "-lllama", f"-Wl,-rpath,{lib}", "-lpthread", "-lm"]
    san = SANITIZE if sanitize else []
    _cc([cc, *san, "-shared", "-o", str(shared), *objs, *link], shared.name)
    binary = out / "bin" / "edgetts-answer"
    _cc([cc, *flags, f"-I{out / 'include'}", "-o", str(binary), str(NATIVE / "edgetts_answer.c"),
         f"-L{out / 'lib'}", "-ledgetts", "-Wl,-rpath,$ORIGIN/../lib", *link], binary.name)  # fmt: skip
    return {"header": out / "include" / "edgetts.h", "shared": shared, "static": static if static.exists() else None,
            "binary": binary, "frontier": out / "src" / "frontier.c", "llama_lib": lib}  # fmt: skip
