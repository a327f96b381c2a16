"""The profile's commands, ``edgetts profile``, ``calibrate``, ``merge`` and ``pareto``: thin adapters
over :mod:`edgetts.profiling` (sweeps, calibration to a device or setting, shards) and
:mod:`edgetts.pareto` (the frontier and its config), registered on :data:`edgetts.cli.app` when that
module is imported.  User errors are one line and exit 2, as everywhere in the command line.
"""

from __future__ import annotations

import json

import typer

from edgetts.cli import (
    ENGINE_HELP,
    GPU_LAYERS_HELP,
    MEMORY_HELP,
    _gpu_layers,
    _interrupts,
    _memory_mb,
    _spec,
    app,
    fail,
    user_errors,
)
from edgetts.cli_display import pictures, print_summary, progress_bar
from edgetts.engines.spec import MAX_THREADS
from edgetts.profiling.config import SweepConfig

# The default sweep, which profile --help shows.
GRID = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in vars(SweepConfig()).items()}


@app.command()
def profile(
    config: str = typer.Option(None, help="Sweep YAML file (see configs/); flags below override its fields."),
    model: list[str] = typer.Option(
        None, help="Model variant (repeatable): built-in name, GGUF file, ONNX directory or quantize manifest; "
        f"with --url, the model name the server knows. Default: {GRID['models']}."
    ),
    engine: str = typer.Option(None, help=ENGINE_HELP),
    url: str = typer.Option(None, help="Profile an OpenAI-compatible server (engine openai-http) at this URL."),
    engine_option: list[str] = typer.Option(None, help="Engine option KEY=VALUE for every model (repeatable)."),
    dataset: str = typer.Option(None, help=f"Built-in benchmark name or JSONL path. Default: {GRID['dataset']}."),
    limit: int = typer.Option(None, min=1, help=f"Problems, spread evenly over levels. Default: {GRID['limit']}."),
    seed: int = typer.Option(None, help=f"Problem sampling and row seeds. Default: {GRID['seed']}."),
    strategies: str = typer.Option(None, help=f"Comma list of strategies. Default: {GRID['strategies']}."),
    budgets: str = typer.Option(None, help=f"Comma list of thinking budgets (tokens). Default: {GRID['budgets']}."),
    n: str = typer.Option(None, "--n", help=f"Comma list of parallelism levels. Default: {GRID['n']}."),
    repeats: int = typer.Option(None, min=1, help=f"Times each query is measured. Default: {GRID['repeats']}."),
    mode: str = typer.Option(
        None, help=f"pooled (one pool of rows per problem answers every cell, on engines with probes) or "
        f"direct (every cell run as in production). Default: {GRID['mode']}."
    ),
    threads: int = typer.Option(
        None, min=1, max=MAX_THREADS, help="CPU threads for llama.cpp (default: all cores but one, as serve)."
    ),
    gpu_layers: str = typer.Option(None, help=GPU_LAYERS_HELP + " Default: the sweep's, else auto."),
    memory_mb: float = typer.Option(None, help=MEMORY_HELP),
    out: str = typer.Option("runs/profile", help="Profile directory (resumed if it holds this sweep)."),
    shard: str = typer.Option(
        None, help="I/N: measure the I-th of N disjoint slices of the problems (from 0), for edgetts merge; N "
        "alone takes I from JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID (Slurm)."
    ),
    force: bool = typer.Option(False, help="Reuse a directory of another sweep (its files move to replaced-*/)."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Measure accuracy, latency, energy and memory per strategy x budget x parallelism; resumable."""
    from edgetts.profiling.config import ConfigError
    from edgetts.profiling.records import RecordsError
    from edgetts.profiling.runner import ProfileError, run_profile, write_summary
    from edgetts.profiling.shards import parse_shard

    def ints(flag, text):
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            fail(f"{flag}: expected a comma list of integers, got {text!r}")

    try:
        cfg = (SweepConfig.from_yaml(config) if config else SweepConfig()).override(
            models=list(model) if model else None, dataset=dataset, limit=limit, seed=seed,
            strategies=[s.strip() for s in strategies.split(",") if s.strip()] if strategies is not None else None,
            budgets=ints("--budgets", budgets) if budgets is not None else None,
            n=ints("--n", n) if n is not None else None,  # an empty list is refused, not read as the default
            repeats=repeats, mode=mode, threads=threads, engine=engine, url=url,
            gpu_layers=("auto" if _gpu_layers(gpu_layers) is None else _gpu_layers(gpu_layers))
            if gpu_layers is not None else None,
            engine_options=_spec(None, "auto", None, engine_option).options if engine_option else None,
        )  # fmt: skip
        slice_ = parse_shard(shard) if shard else None
    except (ConfigError, ProfileError) as e:
        fail(str(e))
    with progress_bar(quiet) as progress, _interrupts() as interrupted:
        try:
            with user_errors():
                summary = run_profile(cfg, out, force=force, progress=progress, memory_mb=_memory_mb(memory_mb),
                                      shard=slice_)  # fmt: skip
            if interrupted():  # a Ctrl-C whose exception a native callback swallowed still counts
                raise KeyboardInterrupt
        except (ConfigError, ProfileError, RecordsError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            write_summary(out)
            typer.echo(f"interrupted: {out} is valid; run the same command to continue", err=True)
            raise typer.Exit(130) from None
    if not quiet:
        print_summary(summary, out)
    from pathlib import Path

    from edgetts.pareto.config import ParetoError, build_config, write_config

    try:
        config, candidates = build_config([out])
        path = write_config(config, Path(out) / "pareto.json")
    except ParetoError as e:
        fail(f"{out} is measured, but its Pareto config could not be written: {e}")
    if not quiet:
        typer.echo(f"wrote {path} ({len(config['frontier'])} frontier points)")
    pictures(config, candidates, Path(out) / "pareto.png", Path(out) / "report.html", quiet=quiet)


@app.command()
def calibrate(
    profile_dir: str = typer.Argument(..., help="A profile measured anywhere (another device, setting or a server)."),
    out: str = typer.Option(..., help="New profile directory (with several --setting, one folder per setting)."),
    setting: list[str] = typer.Option(
        None, help="KEY=VALUE[,KEY=VALUE] of threads, gpu_layers, power_mode (repeatable: one calibration each). "
        "Default: this device's defaults."
    ),
    switch: str = typer.Option(
        None, help="Command that sets a power_mode, with {power_mode} in it, e.g. 'sudo nvpmodel -m {power_mode}' "
        "(nvpmodel takes the mode's number: --setting power_mode=1), run with the mode quoted, no input and 120 s at "
        "most; the mode is read back before measuring."
    ),
    model_dir: str = typer.Option(
        None, help="Folder holding the profiled model files here (found by file name; else where the source had them)."
    ),
    artifact: list[str] = typer.Option(
        None, help="For a source measured through a server (openai-http): the model file here that the server ran "
        "(MODEL=FILE where it measured several; default: the served name, as a built-in name or a file). Nothing can "
        "check it is the same file: the calibration says so."
    ),
    memory_mb: float = typer.Option(None, help=MEMORY_HELP),
    anchor_s: float = typer.Option(
        30.0, min=0.0, max=86400.0, help="Seconds of direct runs that anchor each cell's latencies (one pass over the "
        "cells at least; more: closer latencies, a longer calibration)."
    ),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Re-time a profile for this device and setting: the source's accuracy, this device's latencies, checked."""
    from pathlib import Path

    from edgetts.pareto.config import ParetoError, build_config, write_config
    from edgetts.profiling.calibrate import calibrate_settings, parse_setting
    from edgetts.profiling.records import RecordsError
    from edgetts.profiling.runner import ProfileError

    try:
        settings = [parse_setting(s) for s in setting or []]
        with progress_bar(quiet) as progress, user_errors():
            done = calibrate_settings(profile_dir, out, settings, switch, model_dir, _memory_mb(memory_mb), progress,
                                      say=typer.echo, anchor_s=anchor_s, artifacts=artifact)  # fmt: skip
        for _, target, _ in done:
            config, _ = build_config([target], require_validated=False)
            write_config(config, Path(target) / "pareto.json")
    except (ProfileError, RecordsError, ParetoError) as e:
        fail(str(e))
    typer.echo(f"wrote {', '.join(str(Path(t) / 'pareto.json') for _, t, _ in done)}")


@app.command()
def merge(
    shards: list[str] = typer.Argument(..., help="Profile directories of one sweep's shards (profile --shard)."),
    out: str = typer.Option(..., help="New profile directory for the joined sweep."),
) -> None:
    """Join the shards of one sweep, measured on several machines, into one profile (and its Pareto config)."""
    from pathlib import Path

    from edgetts.pareto.config import ParetoError, build_config, write_config
    from edgetts.profiling.records import RecordsError
    from edgetts.profiling.runner import ProfileError
    from edgetts.profiling.shards import describe
    from edgetts.profiling.shards import merge as join

    try:
        result = join(shards, out)
        config, _ = build_config([out])
        path = write_config(config, Path(out) / "pareto.json")
    except (ProfileError, RecordsError, ParetoError) as e:
        fail(str(e))
    if result["missing_shards"]:
        typer.echo(f"warning: shard(s) {', '.join(result['missing_shards'])} of this sweep were not given", err=True)
    if result["mixed_settings"]:
        mixed = "; ".join(f"{k or 'unknown'} ({len(v)} dir(s))" for k, v in result["mixed_settings"].items())
        typer.echo(f"warning: the shards were measured under different settings ({mixed}): each cell's latency "
                   "mixes them; calibrate the merged profile (edgetts calibrate) for the device it will run on",
                   err=True)  # fmt: skip
    typer.echo(f"merged {out}: {describe(result)}; wrote {path}")


@app.command()
def pareto(
    profiles: list[str] = typer.Argument(..., help="Profile directories (model variants merge into one frontier)."),
    out: str = typer.Option(
        None, help="Where to write the edgetts.pareto/v1 config (default: pareto.json in the first profile directory)."
    ),
    quantile: str = typer.Option("p95", help="Latency quantile of the frontier: p50, p90, p95, p99."),
    constraints: str = typer.Option(
        None, help='JSON constraints, e.g. \'{"energy_j": {"max": 2}, "accuracy": {"min": 0.5}}\'.'
    ),
    strict: bool = typer.Option(False, help="Drop points whose accuracy interval overlaps a faster point's."),
    plot: bool = typer.Option(True, help="Also write <out>.png and <out>-report.html (needs matplotlib)."),
    accept_unvalidated: bool = typer.Option(
        False, "--accept-unvalidated", help="Use pooled profiles whose modelled latencies failed their direct check."
    ),
    setting: str = typer.Option(
        None, help="Keep the points of one device setting, e.g. threads=2 (profiles from edgetts calibrate --setting)."
    ),
) -> None:
    """Build the Pareto config (accuracy against a latency quantile) from profile directories."""
    from edgetts.pareto.config import ParetoError, build_config, write_config

    try:
        spec = json.loads(constraints) if constraints else None
    except (json.JSONDecodeError, RecursionError) as e:
        fail(f"--constraints is not valid JSON ({getattr(e, 'msg', 'nested too deep')})")
    from pathlib import Path

    out = out or str(Path(profiles[0]) / "pareto.json")
    try:
        from edgetts.profiling.calibrate import parse_setting
        from edgetts.profiling.runner import ProfileError

        wanted = parse_setting(setting) if setting is not None else None  # "" is refused, not "every setting"
    except ProfileError as e:
        fail(str(e))
    try:
        config, candidates = build_config(profiles, quantile, spec, strict, require_validated=not accept_unvalidated,
                                          setting=wanted)  # fmt: skip
        path = write_config(config, out)
    except ParetoError as e:
        fail(str(e))
    typer.echo(f"wrote {path}: {len(config['frontier'])} frontier points of {len(candidates)} cells")
    if plot:
        pictures(config, candidates, path.with_suffix(".png"), path.with_name(path.stem + "-report.html"))
