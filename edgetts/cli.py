"""The ``edgetts`` command line: a thin adapter over the library.

Every command turns user mistakes (a missing file, a malformed dataset, a bad value) into
one line on stderr and exit status 2; anything else is a bug and keeps its traceback.  The
command group (:class:`OneLineErrors`) does the same for the usage errors Click finds while
parsing (an option out of range, a missing argument, an unknown option).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

from edgetts.cli_display import print_eval, problem_progress
from edgetts.engines.base import EngineError
from edgetts.engines.spec import MAX_THREADS
from edgetts.models import ModelNotFound
from edgetts.quantization import QuantizeError
from edgetts.strategies.base import StrategyError
from edgetts.tasks.datasets import DatasetError

try:  # recent Typer releases carry their own copy of Click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older Typer on Click itself
    from click import exceptions as click_errors


class OneLineErrors(TyperGroup):
    """The command group, with Click's usage errors (a value out of range, a missing argument, an
    unknown option) printed as one line ``error: ...`` with exit status 2, like every other user
    error; help and everything else keep Typer's behaviour."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:
            typer.echo(e.ctx.get_help())
            rv = e.exit_code
        except click_errors.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            rv = 2
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Deploy reasoning LLMs on edge devices with test-time scaling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"edgetts {version('edgetts')}")
        except PackageNotFoundError:
            typer.echo("edgetts (not installed: version unknown)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Deploy reasoning LLMs on edge devices with test-time scaling."""


USER_ERRORS = (DatasetError, ModelNotFound, EngineError, StrategyError, QuantizeError)


@contextmanager
def user_errors():
    try:
        yield
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@contextmanager
def _interrupts():
    """Remembers a Ctrl-C (SIGINT) as well as raising it: Python raises KeyboardInterrupt at the next
    bytecode, and where that falls inside a callback llama.cpp makes into Python (its log callback),
    ctypes prints and drops the exception; the flag keeps the user's Ctrl-C from being lost."""
    import signal
    import threading

    seen = {"sigint": False}
    # Not from another thread, and not where SIGINT is ignored (a job started in the background of a
    # script: a Ctrl-C at the terminal is not for it).
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield lambda: False
        return

    def handler(signum, frame):
        seen["sigint"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: seen["sigint"]
    finally:
        signal.signal(signal.SIGINT, previous)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


GPU_LAYERS_HELP = ("Layers llama.cpp offloads to the GPU: auto (every layer where llama.cpp can offload, none "
                   "otherwise), -1 (all) or a number.")  # fmt: skip
MEMORY_HELP = "Cap, in MB, on the memory an engine may plan for (default: what the device has free)."


def _gpu_layers(text: str | None) -> int | None:
    """``--gpu-layers`` as the engine option: None for auto, else an integer >= -1 (exit 2 otherwise)."""
    from edgetts.engines.offload import parse_gpu_layers

    try:
        return parse_gpu_layers(text)
    except EngineError as e:
        fail(f"--gpu-layers: {e}")


def _price(value: float) -> float:
    if not (value >= 0 and value != float("inf")):
        fail(f"--price must be a finite number >= 0, got {value}")
    return value


def _memory_mb(value: float | None) -> float | None:
    import math

    if value is not None and (not math.isfinite(value) or value <= 0):
        fail(f"--memory-mb must be a positive number of megabytes, got {value}")
    return value


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show what this machine offers: engines, accelerators, energy sources, built-in model and benchmark."""
    from edgetts.doctor import report

    rep = report()
    if as_json:
        typer.echo(json.dumps(rep))
        return
    from rich.console import Console
    from rich.markup import escape

    c = Console(highlight=False)
    p = rep["platform"]
    c.print(f"[bold]platform[/]  {p['system']} {p['machine']}, Python {p['python']}, {p['cpu_count']} CPUs")
    c.print("[bold]engines[/]")
    for e in rep["engines"]:
        mark = "[green]yes[/]" if e["available"] else "[yellow]no[/]"
        c.print(f"  {e['name']:<18} {mark}  {escape(e.get('version', e.get('detail', '')))}")
    acc = rep["accelerators"]
    c.print("[bold]accelerators[/]")
    c.print(f"  cuda (nvml)        {escape(acc['cuda_nvml']['detail'])}")
    c.print(f"  jetson             {escape(acc['jetson'])}")
    c.print(f"  llama.cpp offload  {escape(acc['llama_cpp']['detail'])}")
    c.print("[bold]energy sources[/]")
    for s in rep["energy_sources"]:
        mark = "[green]yes[/]" if s["available"] else "[yellow]no[/]"
        c.print(f"  {s['name']:<18} {mark}  {escape(s['detail'])}")
    c.print("[bold]built-in[/]")
    for group in ("models", "hf_models", "benchmarks"):
        for name, f in rep["builtin"][group].items():
            state = f"{f['bytes']:,} bytes" if f["exists"] else "[red]MISSING[/]"
            c.print(f"  {group[:-1]:<10} {name:<7} {state}  {f['path']}")


@app.command()
def evaluate(
    model: str = typer.Option("tiny", help="Built-in model name, GGUF file or ONNX directory."),
    dataset: str = typer.Option("arith", help="Built-in benchmark name or path to a JSONL file."),
    n: int = typer.Option(8, min=1, help="Rows per majority vote."),
    pool: int = typer.Option(32, min=1, help="Samples drawn per problem; votes are averaged over subsets of it."),
    limit: int = typer.Option(None, min=1, help="Use at most this many problems, spread over levels."),
    seed: int = typer.Option(0, min=0, max=4294967295, help="Sampling seed."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature."),
    max_tokens: int = typer.Option(160, min=1, help="Token budget per sample."),
    family: str = typer.Option(
        "auto", help="Reasoning format: auto (guessed from the model), tiny, deepseek-r1, qwen3, plain."
    ),
    cut_probe: bool = typer.Option(True, help="On the hardest level, also cut reasoning at half its median."),
    threads: int = typer.Option(None, min=1, max=MAX_THREADS, help="CPU threads for llama.cpp."),
    gpu_layers: str = typer.Option("auto", help=GPU_LAYERS_HELP),
    memory_mb: float = typer.Option(None, help=MEMORY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Accuracy per level: one sample, majority of N, and the cost of cutting reasoning short."""
    from edgetts.engines import EngineSpec, open_engine
    from edgetts.engines.base import SamplingParams
    from edgetts.evaluate import evaluate as run_eval
    from edgetts.models.families import FAMILIES
    from edgetts.tasks.datasets import load_dataset

    if family != "auto" and family not in FAMILIES:
        fail(f"unknown family {family!r}; choose one of: auto, {', '.join(FAMILIES)}")
    with user_errors():
        examples = load_dataset(dataset, limit=limit, seed=seed if limit else None)
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens)
        if pool < n:
            fail(f"--pool ({pool}) must be at least --n ({n})")
        spec = EngineSpec(artifact=model).with_options(threads=threads, gpu_layers=_gpu_layers(gpu_layers))
        engine, guessed = open_engine(spec, max_rows=pool, max_tokens=max_tokens, memory_mb=_memory_mb(memory_mb))
        path = spec.resolved().artifact
    fam = guessed if family == "auto" else FAMILIES[family]
    levels = {ex.level for ex in examples}
    hardest = [ex for ex in examples if ex.level == max(levels, key=lambda lv: (lv is not None, str(lv)))]
    total = len(examples) + (len(hardest) if cut_probe else 0)
    with problem_progress(total, quiet=as_json) as advance:
        res = run_eval(
            engine, examples, fam, n=n, pool=pool, params=params, cut_probe=cut_probe,
            progress=advance, model_name=str(path), dataset_name=dataset,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
        return
    print_eval(res)


def _spec(model: str | None, engine: str, url: str | None, options: list[str] | None):
    """The engine spec the flags describe (``--model``, ``--engine``, ``--url``, ``--engine-option k=v``)."""
    from edgetts.engines import EngineSpec

    opts = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--engine-option: expected KEY=VALUE, got {item!r}")
        opts[key] = yaml_scalar(value)
    return EngineSpec(engine, model if model is not None else ("tiny" if not url else None), url, opts)


def yaml_scalar(text: str):
    """A flag value as YAML reads it (numbers and booleans typed, anything else a string)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str)) else text


ENGINE_HELP = "Engine: auto (from the model file), llama.cpp, onnx-genai, openai-http, tensorrt."


# The runtime's commands (run, serve) and the profile's (profile, calibrate, merge, pareto) live in their
# own modules; importing them here registers them (after the helpers they use, and in this place in --help).
from edgetts import cli_profile, cli_runtime  # noqa: E402, F401


@app.command()
def standin(
    shape: str = typer.Option(..., help="qwen3-0.6b, r1-distill-qwen-1.5b, narrow-qwen3 or narrow-r1."),
    out: str = typer.Option(..., help="GGUF file to write."),
    seed: int = typer.Option(0, min=0, help="Seed of the random weights."),
    dtype: str = typer.Option("f16", help="f16 or f32 (quantize it afterwards with edgetts quantize)."),
) -> None:
    """Write a random-weight stand-in GGUF of a real reasoning model.

    Tokenizer (the Qwen2-family BPE vocabulary of 151,936 tokens with the model's added tokens
    at their real ids), chat template, architecture, compute and memory shape are the real
    model's; the weights are random, so the OUTPUT TEXT IS NOISE. For testing prompts, budget
    forcing, memory planning and step cost without downloading a model. The vocabulary and
    templates come from llama-cpp-python's source distribution on the package index, downloaded
    once into $EDGETTS_CACHE (default ~/.cache/edgetts).
    """
    from edgetts.models.standin import StandinError, write_standin

    try:
        path = write_standin(shape, out, seed=seed, dtype=dtype)
    except (StandinError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; random weights: output text is noise)")


@app.command("export-c")
def export_c(
    config: str = typer.Argument(..., help="An edgetts.pareto/v1 config."),
    out: str = typer.Option("edgetts_policy.h", help="Header to write."),
) -> None:
    """Write a self-contained C99 header: the frontier, edgetts_select() and a majority-vote helper."""
    from edgetts.export.c_header import export_c as write_header
    from edgetts.pareto.config import ParetoError, load_config

    try:
        path = write_header(load_config(config), out)
    except ParetoError as e:
        fail(str(e))
    typer.echo(f"wrote {path}")


@app.command("build-c")
def build_c_cmd(
    config: str = typer.Argument(..., help="An edgetts.pareto/v1 config of llama.cpp (GGUF) points."),
    out: str = typer.Option(..., "--out", help="Folder for include/, lib/ and bin/edgetts-answer."),
    cc: str | None = typer.Option(None, help="C compiler (default: $CC, else cc)."),
    llama_include: str | None = typer.Option(None, help="Folder of llama.h (default: llama-cpp-python's)."),
    llama_lib: str | None = typer.Option(None, help="Folder of libllama (default: llama-cpp-python's)."),
    sanitize: bool = typer.Option(False, help="Build with -fsanitize=address,undefined."),
) -> None:
    """Build the runtime in C (libedgetts and edgetts-answer) with the config's frontier compiled in."""
    from edgetts.export.build_c import BuildError, build_c
    from edgetts.pareto.config import ParetoError, load_config, validation_note

    try:
        paths = build_c(config, out, cc=cc, llama_include=llama_include, llama_lib=llama_lib, sanitize=sanitize)
        note = validation_note(load_config(config), config)
    except (BuildError, ParetoError, EngineError) as e:
        fail(str(e))
    if note:
        typer.echo(note, err=True)
    typer.echo(f"wrote {paths['header']}, {paths['shared']} and {paths['binary']}")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="GGUF (f32/f16/bf16), Hugging Face directory, or 'tiny'."),
    to: str = typer.Option(None, "--to", help="Comma list of GGUF types, e.g. q8_0,q6_k,q5_k_m,q4_k_m,q4_0."),
    onnx: str = typer.Option(None, help="Comma list of ONNX exports PRECISION[:EXECUTION], e.g. int4:cpu,fp16:cuda."),
    recipe: str = typer.Option(None, help="A recipe file, e.g. quantize/jetson-agx-orin-64gb.yaml."),
    out: str = typer.Option(..., help="Output directory (gets manifest.json)."),
    threads: int = typer.Option(0, min=0, max=MAX_THREADS, help="Quantization threads (0: all cores)."),
    imatrix: str = typer.Option(None, help="Importance matrix (llama.cpp GGUF imatrix file)."),
    converter: str = typer.Option(
        None, help="llama.cpp's convert_hf_to_gguf.py for Hugging Face directories (or set EDGETTS_CONVERTER)."
    ),
) -> None:
    """Make model variants: GGUF k-quants in process through llama.cpp, ONNX through onnxruntime-genai."""
    from pathlib import Path

    from edgetts.models import BUILTIN, BUILTIN_HF
    from edgetts.quantization import QuantizeError
    from edgetts.quantization.onnx_export import parse_spec
    from edgetts.quantization.recipes import load_recipe
    from edgetts.quantization.variants import make_variants

    try:
        plan = load_recipe(recipe) if recipe else {"gguf": [], "onnx": []}
        if to:
            plan["gguf"] = [t.strip().lower() for t in to.split(",") if t.strip()]
        if onnx:
            plan["onnx"] = [parse_spec(s) for s in onnx.split(",") if s.strip()]
        if not plan["gguf"] and not plan["onnx"]:
            fail("nothing to make: give --to, --onnx or --recipe")
        if imatrix and not plan["gguf"]:
            fail("--imatrix applies to GGUF types: give --to or a recipe with gguf types")
        gguf_src = BUILTIN["tiny"] if model == "tiny" else Path(model)
        hf_src = BUILTIN_HF["tiny"] if model == "tiny" else Path(model)
        make_variants(out, gguf_src, plan["gguf"], hf_src, plan["onnx"], threads, imatrix, converter, typer.echo)
    except QuantizeError as e:
        fail(str(e))
    except KeyboardInterrupt:
        # The output directory has removed what it staged.  A native quantization may still run
        # in its worker thread: leave at once rather than through the interpreter's shutdown.
        typer.echo(f"interrupted: nothing was written to {out}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    typer.echo(f"manifest: {Path(out) / 'manifest.json'}")


@app.command("compile")
def compile_cmd(
    onnx_dir: str = typer.Argument(..., help="ONNX model directory (from edgetts quantize --onnx)."),
    precision: str = typer.Option("fp16", help="fp16 or int8."),
    out: str = typer.Option(None, help="Output directory (default: <onnx_dir>/trt-<precision>)."),
) -> None:
    """Build a TensorRT engine from an ONNX model, on the target GPU (with a timing cache)."""
    from edgetts.quantization import QuantizeError
    from edgetts.quantization.tensorrt import compile_engine

    try:
        compile_engine(onnx_dir, precision, out, log=typer.echo)
    except QuantizeError as e:
        fail(str(e))

