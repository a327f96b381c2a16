"""The runtime's commands, ``edgetts run`` and ``edgetts serve``: thin adapters over
:mod:`edgetts.runtime` (an answerer of questions, one or a stream; the HTTP server), registered
on :data:`edgetts.cli.app` when that module is imported.  User errors are one line and exit 2, as
everywhere in the command line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager

import typer

from edgetts.cli import (
    ENGINE_HELP,
    GPU_LAYERS_HELP,
    MEMORY_HELP,
    _gpu_layers,
    _memory_mb,
    _price,
    _spec,
    app,
    fail,
    user_errors,
)
from edgetts.engines.spec import MAX_THREADS


@app.command()
def run(
    question: str = typer.Argument(
        ..., help="The question to answer, or - to answer each line of standard input in turn (the engines stay "
        "open; one answer per line with --json)."
    ),
    model: str = typer.Option(
        None, help="Built-in model name (tiny), GGUF file or ONNX directory; for a server, the model name it knows. "
        "Default: tiny."
    ),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    url: str = typer.Option(None, help="OpenAI-compatible server URL (engine openai-http)."),
    engine_option: list[str] = typer.Option(None, help="Engine option KEY=VALUE, e.g. provider=cuda (repeatable)."),
    strategy: str = typer.Option(
        None,
        help="single, budget-forcing, length-hint, majority (default), weighted, best-of-n, first-finish, adaptive, "
        "esc. With --config: overrides the point's.",
    ),
    n: int = typer.Option(None, min=1, max=64, help="Rows (parallel samples); default 8, or the point's."),
    budget: int = typer.Option(None, min=1, help="Thinking tokens per row; default 256, or the point's."),
    deadline_ms: float = typer.Option(None, min=0.001, help="Wall-clock deadline for the whole answer; "
                                      "inf: none binds (a config's most accurate point)."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature."),
    seed: int = typer.Option(0, min=0, max=4294967295, help="Sampling seed (row i uses seed + i)."),
    family: str = typer.Option("auto", help="Reasoning format: auto, tiny, deepseek-r1, qwen3, plain."),
    threads: int = typer.Option(None, min=1, max=MAX_THREADS, help="CPU threads for llama.cpp."),
    gpu_layers: str = typer.Option("auto", help=GPU_LAYERS_HELP),
    memory_mb: float = typer.Option(None, help=MEMORY_HELP),
    raw_prompt: bool = typer.Option(False, "--raw-prompt", help="Ignore the model's chat template."),
    config: str = typer.Option(
        None, help="Pareto config: the policy picks engine, model, strategy, n and budget for --deadline-ms "
        "(and --energy-j)."
    ),
    energy_j: float = typer.Option(None, help="Energy limit per query in joules (> 0), with --config."),
    price: float = typer.Option(
        0.0, help="With --config: a price on compute, in accuracy per ms of predicted latency; the point that "
        "maximizes accuracy minus price x latency is chosen (0: the most accurate that fits)."
    ),
    mean_ms: float = typer.Option(
        None, help="With --config and questions on standard input: a mean latency per question (ms) that the "
        "price holds, rising while the recent answers took longer and falling while they took less (starting "
        "from --price)."
    ),
    mean_j: float = typer.Option(
        None, help="Like --mean-ms for energy (J per answer, what the device drew since the previous answer), on a "
        "battery: needs an energy meter here and a config with energy_j."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (one per question with -)."),
) -> None:
    """Answer a question with a test-time-scaling strategy and print the answer and a trace summary."""
    from edgetts.cli_display import print_answer
    from edgetts.pareto.config import ParetoError
    from edgetts.runtime.oneshot import Answerer, answer_lines
    from edgetts.runtime.policy import DeadlineTooShort
    from edgetts.runtime.pricing import MeanSpend
    from edgetts.strategies import STRATEGIES
    from edgetts.telemetry.meters import MeterUnavailable

    if config and (model or url or engine != "auto" or engine_option):
        fail("--config names the engine and model of each point; drop --model, --engine, --url and --engine-option")
    if energy_j is not None and not config:
        fail("--energy-j limits the policy's choice: it needs --config")
    if price and not config:
        fail("--price weighs the policy's choice: it needs --config")
    if energy_j is not None and not (energy_j > 0 and energy_j != float("inf")):
        fail(f"--energy-j must be a positive number of joules, got {energy_j}")
    if strategy in STRATEGIES and STRATEGIES[strategy].single_row and n is not None and n > 1:
        fail(f"--strategy {strategy} runs one row; --n {n} would be ignored (drop it, or use majority, esc...)")
    mean = _mean_budget(mean_ms, mean_j)
    if mean is not None and (not config or question != "-"):
        fail(f"{'--mean-j' if mean_j is not None else '--mean-ms'} holds a mean over many questions: give --config "
             "and the questions on standard input (-)")  # fmt: skip
    spec = None if config else _spec(model, engine, url, engine_option)
    failed = []
    try:
        with user_errors(), Answerer(spec, config, strategy, n, budget, temperature, seed, raw_prompt,
                                     None if family == "auto" else family, _memory_mb(memory_mb), threads=threads,
                                     gpu_layers=_gpu_layers(gpu_layers)) as answerer:  # fmt: skip
            spend = MeanSpend(answerer.policy.frontier, mean, mean_j is not None, _price(price)) if mean else None
            try:
                if question != "-":
                    answerer.check(deadline_ms, energy_j)
                    with _writing():
                        print_answer(answerer.answer(question, deadline_ms, energy_j, _price(price)), as_json)
                    return
                if sys.stdin is None:  # started with standard input closed (<&-)
                    fail("standard input is closed: give the questions there, one per line, or a question "
                         "instead of -")  # fmt: skip
                asked = 0
                for line, out in answer_lines(answerer, sys.stdin, deadline_ms, energy_j, _price(price), spend):
                    asked += 1
                    with _writing():
                        if isinstance(out, str):  # that question's reason; the others go on
                            failed.append(line)
                            said = json.dumps({"line": line, "error": out}) if as_json else f"error: line {line}: {out}"
                            typer.echo(said, err=not as_json)
                        else:
                            print_answer(out, as_json, line)
                if not asked:  # an empty file or a pipe that wrote nothing: say so rather than print nothing
                    fail("no question on standard input (one per line; blank lines are skipped)")
            finally:
                if spend is not None:
                    spend.close()
    except (ParetoError, DeadlineTooShort, MeterUnavailable) as e:
        fail(str(e))
    if failed:
        fail(f"{len(failed)} question(s) could not be answered (line {', '.join(map(str, failed[:10]))})")


def _mean_budget(mean_ms: float | None, mean_j: float | None) -> float | None:
    """The mean budget ``--mean-ms`` or ``--mean-j`` sets (one of them at most, a finite number > 0), or None."""
    if mean_j is not None and mean_ms is not None:
        fail("--mean-ms and --mean-j each set the price: give one")
    for what, unit, value in (("--mean-ms", "milliseconds", mean_ms), ("--mean-j", "joules", mean_j)):
        if value is not None and not (0 < value < float("inf")):
            fail(f"{what} must be a finite number of {unit} > 0, got {value}")
    return mean_j if mean_j is not None else mean_ms


@contextmanager
def _writing():
    """Answers going out: a reader that went away (``edgetts run - | head -1``) ends the command quietly, as
    Unix tools do; output that cannot be written (a full disk) is said in one line; both exit 1."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        raise typer.Exit(1) from None
    except OSError as e:
        typer.echo(f"error: cannot write the answers: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def serve(
    config: str = typer.Option(..., help="Pareto config (edgetts.pareto/v1) the server answers from."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: any free port)."),
    api_key: str = typer.Option(None, envvar="EDGETTS_API_KEY", help="Require this bearer key (except /healthz)."),
    deadline_ms: float = typer.Option(2000.0, min=1, max=3_600_000,
                                      help="Deadline for requests that give none (at most an hour, as a body's)."),
    max_queue: int = typer.Option(32, min=1, max=4096, help="Requests admitted at once (running and waiting; "
                                  "each holds a thread)."),
    overload: str = typer.Option("downgrade", help="When the queue makes a deadline unmeetable: downgrade or refuse."),
    max_body_kb: int = typer.Option(256, min=1, max=1024 * 1024, help="Largest request body accepted (at most 1 GB)."),
    threads: int = typer.Option(
        None, min=1, max=MAX_THREADS, help="CPU threads for llama.cpp (default: all cores but one)."
    ),
    gpu_layers: str = typer.Option("auto", help=GPU_LAYERS_HELP),
    memory_mb: float = typer.Option(None, help=MEMORY_HELP + " Sizes the default --batch-rows."),
    price: float = typer.Option(
        0.0, help="A price on compute, in accuracy per ms of predicted latency (beside the batch): each request "
        "gets the point that maximizes accuracy minus price x latency (0: the most accurate that fits)."
    ),
    mean_ms: float = typer.Option(
        None, help="A mean latency budget per request (ms): the price rises while the recent mean is above it and "
        "falls while below (starting from --price)."
    ),
    mean_j: float = typer.Option(
        None, help="A mean energy budget per answer (J), for a battery: the price, on each point's profiled "
        "energy, rises while the energy the device drew per answer lately is above it and falls while below. "
        "Needs an energy meter here and a config with energy_j."
    ),
    load_price: bool = typer.Option(
        False, "--load-price", help="A price on engine time that follows the load: 0 while the requests admitted "
        "lately ask for under a fifth of the engine's time, rising to its ceiling at three fifths, so that under "
        "load cheaper points are chosen before anyone is refused."
    ),
    sequential: bool = typer.Option(False, help="One request at a time per engine instead of one shared batch."),
    batch_rows: int = typer.Option(
        None, min=1, max=256, help="Rows a llama.cpp engine holds in its running batch, over all requests "
        "(default: the most that fit in the memory the device has free, with headroom, up to max(64, eight "
        "times the frontier's largest n)); each round decodes those it can afford."
    ),
    read_timeout: float = typer.Option(
        10.0, min=0.1, max=3600, help="Seconds a client may take to send a request's headers, or to send the "
        "next part of its body, before the server answers 408 and closes the connection."
    ),
    insecure_no_auth: bool = typer.Option(
        False, help="Allow a non-loopback --host without --api-key (anyone who reaches the port may use it)."
    ),
) -> None:
    """Serve the Pareto config over an OpenAI-compatible HTTP API, one strategy per request under its deadline.

    Concurrent requests share one running batch per llama.cpp engine (continuous batching);
    admission predicts each request's latency beside the requests already admitted and takes the
    most accurate point that still fits, or answers 429 with Retry-After.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        fail("edgetts serve needs FastAPI and uvicorn: pip install 'edgetts[serve]'")

    from edgetts.pareto.config import ParetoError
    from edgetts.runtime.http import create_app
    from edgetts.runtime.listen import ListenError, listen
    from edgetts.runtime.listen import run as run_server
    from edgetts.telemetry.meters import MeterUnavailable

    if overload not in ("downgrade", "refuse"):
        fail(f"--overload must be downgrade or refuse, got {overload!r}")
    _price(price)
    _mean_budget(mean_ms, mean_j)
    if load_price and (mean_ms is not None or mean_j is not None or price):
        fail("--load-price sets the price itself: drop --price, --mean-ms and --mean-j")
    if api_key is None:  # an empty EDGETTS_API_KEY reads as unset: it must not mean "no authentication"
        api_key = os.environ.get("EDGETTS_API_KEY")
    if api_key is not None and not api_key.strip():
        fail("--api-key (or EDGETTS_API_KEY) is empty; give a key, or leave it unset for no authentication")
    if not api_key and not _loopback(host) and not insecure_no_auth:
        fail(f"--host {host} is reachable from other machines: give --api-key, or --insecure-no-auth to serve "
             "without one")  # fmt: skip
    try:
        sock = listen(host, port)  # before the engines load: a busy port fails at once
    except ListenError as e:
        fail(str(e))
    try:
        with user_errors():
            app_ = create_app(config, api_key, deadline_ms, max_queue, overload, max_body_kb * 1024, threads,
                              batching=not sequential, rows=batch_rows, read_timeout_s=read_timeout,
                              gpu_layers=_gpu_layers(gpu_layers), memory_mb=_memory_mb(memory_mb),
                              notify=lambda line: typer.echo(line, err=True), price=price,
                              mean_ms=mean_ms, load_price=load_price, mean_j=mean_j)  # fmt: skip
    except (ParetoError, MeterUnavailable) as e:
        sock.close()
        fail(str(e))
    address = sock.getsockname()
    where = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    points = len(app_.state.server.policy.frontier)
    rows = app_.state.server.executor.rows
    typer.echo(f"edgetts serve: listening on http://{where}:{address[1]} ({config}: {points} frontier point(s), "
               f"{rows} batch rows)")
    # Idle keep-alive connections close after 20 s; stalled headers or body get 408.
    run_server(app_, sock, header_timeout_s=read_timeout)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere
