"""What the command line shows: progress of long work, the profile and evaluation tables, the
pictures of a Pareto config and the answers of ``edgetts run``.  Kept apart from
:mod:`edgetts.cli`, which only parses and calls.

Progress has phases, each with its own count and time left: a rich bar on a terminal, log
lines (one per 5% of a phase, :class:`PhaseLog`) when stderr is not one, nothing when quiet.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from contextlib import contextmanager

import typer


def shown(text: str) -> str:
    """``text`` for a terminal: control characters (a model's ESC sequence would drive the terminal, a NUL
    cuts the line for C readers) and lone surrogates (not writable as UTF-8) as escapes like ``\\x1b``."""
    if all(c.isprintable() or c == " " for c in text):
        return text
    return "".join(c if unicodedata.category(c) not in ("Cc", "Cs") else repr(c)[1:-1] for c in text)


def pictures(config, candidates, png, html, quiet: bool = False) -> None:
    """``png`` and ``html`` of the config; ``quiet`` silences the terminal, not the files."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not quiet:
            typer.echo("no plot: matplotlib is not installed (pip install 'edgetts[report]')", err=True)
        return
    from edgetts.outputs import OutputError, check_output, contains
    from edgetts.pareto.report import PNG_TITLE, plot, report

    try:  # pictures never replace a file edgetts did not write (the config is written already)
        check_output(png, contains(PNG_TITLE, within=4096))
        check_output(html, contains("<title>edgetts Pareto report", within=4096))
    except OutputError as e:
        typer.echo(f"no pictures: {e}", err=True)
        return
    plot(config, candidates, png)
    report(config, png, html, candidates=candidates)
    if not quiet:
        typer.echo(f"wrote {png} and {html}")



@contextmanager
def progress_bar(quiet: bool):
    """A profile's phases (calibrating, sweep, validating), each with its own count and time left:
    a rich bar on a terminal, a log line per 5% of a phase otherwise, nothing when quiet."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        yield PhaseLog(lambda line: typer.echo(line, err=True))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as prog:  # fmt: skip
        task = prog.add_task("profile", total=None)
        current = [None]

        def update(done, total, what, phase="sweep"):
            label = f"{phase:<11} {what[:32]}"
            if phase != current[0]:  # a new phase: its own count, and its own clock for the time left
                current[0] = phase
                prog.reset(task, total=total, completed=done, description=label)
            prog.update(task, completed=done, total=total, description=label)

        yield update


class PhaseLog:
    """Progress as log lines (no terminal): one per 5% of each phase, with the time left in it,
    measured from the steps this run has done in the phase."""

    def __init__(self, emit):
        self.emit, self.phase, self.t0, self.first, self.last = emit, None, 0.0, 0, -1

    def __call__(self, done: int, total: int, what: str, phase: str = "sweep") -> None:
        import time

        now = time.monotonic()
        if phase != self.phase:
            self.phase, self.t0, self.first, self.last = phase, now, done, -1
        pct = int(100 * done / max(1, total))
        if pct // 5 == self.last // 5 and done != total:
            return
        self.last = pct
        left = ""
        if done > self.first and done < total:
            left = f", about {(now - self.t0) / (done - self.first) * (total - done):.0f} s left"
        self.emit(f"profile: {phase} {done}/{total} ({pct}%{left}) {what}")


def print_summary(summary: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgetts.profiling.runner import short

    # Model file names, not whole paths (which wrapped over several lines a row at 80 columns):
    # one model goes in the title, several get a column (variants differ at the end of the name).
    models = sorted({c["model"] for c in summary["cells"]})
    one = len(models) == 1
    t = Table(title=f"profile {out}" + (f": {short(models[0])}" if one else ""))
    if not one:
        t.add_column("model", overflow="fold")
    for col in ("strategy", "n", "budget", "acc % (CI)", "p50 ms", "p95 ms", "tokens", "J"):
        t.add_column(col, justify="right")
    for c in summary["cells"]:
        lo, hi = c["accuracy_ci95"]
        energy = f"{c['energy_j']:.3f}" if c["energy_j"] is not None else c["energy_source"]
        t.add_row(*([] if one else [short(c["model"])]), c["strategy"], str(c["n"]), str(c["budget"]),
                  f"{100 * c['accuracy']:.0f} ({100 * lo:.0f}-{100 * hi:.0f})",
                  f"{1000 * c['latency_s']['p50']:.1f}", f"{1000 * c['latency_s']['p95']:.1f}",
                  f"{c['tokens']['generated']:.0f}", energy)  # fmt: skip
    Console().print(t)


@contextmanager
def problem_progress(total: int, quiet: bool):
    """``advance(k)`` over ``total`` problems: a bar on a terminal, log lines with the time left otherwise."""
    if quiet:
        yield lambda k: None
        return
    if not sys.stderr.isatty():
        log, done = PhaseLog(lambda line: typer.echo(line.replace("profile:", "evaluate:", 1), err=True)), [0]

        def advance(k):
            done[0] += k
            log(done[0], total, "", "problems")

        yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn("problems"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*cols, transient=True) as prog:
        task = prog.add_task("eval", total=total)
        yield lambda k: prog.advance(task, k)


def print_eval(res) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{res.dataset}: {res.model}\n(pool {res.pool} samples per problem, T={res.temperature}, seed={res.seed})"
    t = Table(title=title)
    for col in ("level", "problems", "single", f"maj@{res.n}", "gain", "tokens", "cut at half", "cut cost"):
        t.add_column(col, justify="right")
    for lv in res.levels:
        cut = cost = ""
        if lv.cut_single is not None:
            cut = f"{100 * lv.cut_single:.1f}% @{lv.cut_budget}"
            cost = f"{100 * (lv.single - lv.cut_single):+.1f}"
        t.add_row(
            "all" if lv.level is None else str(lv.level), str(lv.problems), f"{100 * lv.single:.1f}%",
            f"{100 * lv.majority:.1f}%",
            f"{100 * (lv.majority - lv.single):+.1f}", f"{lv.mean_tokens:.0f}", cut, cost,
        )  # fmt: skip
    Console().print(t)


def print_answer(out, as_json: bool, line: int | None = None) -> None:
    """One answer of ``edgetts run`` (:class:`~edgetts.runtime.oneshot.Answer`): a JSON object, or the point, the
    answer and a summary of the trace; ``line`` is the question's line on standard input, where it came from
    there.  Flushed, so that a program reading the answers gets each as it is given."""
    for note in out.notes:
        typer.echo(note, err=True)
    trace, chosen = out.trace, out.selection
    if as_json:
        d = trace.to_dict()
        d["engine"] = out.spec.to_dict()
        if chosen:
            d["point"] = {"index": chosen.index, "id": chosen.point["id"], "miss": chosen.miss, "price": out.price,
                          "ran": {"strategy": out.strategy, "n": out.n, "budget": out.budget}}  # fmt: skip
        if line is not None:
            d["line"] = line
        typer.echo(json.dumps(d))
    else:
        if line is not None:
            typer.echo(f"line {line}:")
        if chosen:
            ran = (out.strategy, out.n, out.budget) != (chosen.point["strategy"], chosen.point["n"],
                                                        chosen.point["budget"])  # fmt: skip
            typer.echo(
                f"point {chosen.index} {chosen.point['id']}" + (" (nothing fits: fastest point)" if chosen.miss else "")
                + (f", run as {out.strategy} n={out.n} b={out.budget}" if ran else "")
                + (f", price {out.price:.3g}" if out.price else "")
            )
        typer.echo(shown(trace.answer) if trace.answer is not None else "(no answer)")
        votes = ", ".join(f"{shown(a)}: {v:g}" for a, v in trace.votes.items()) or "none"
        deadline = "" if trace.deadline_met is None else f", deadline {'met' if trace.deadline_met else 'MISSED'}"
        typer.echo(
            f"{trace.strategy}: {trace.rows_used} row(s), {trace.generated_tokens} tokens, "
            f"{trace.wall_s * 1000:.0f} ms (first token {1000 * (trace.ttft_s or 0):.0f} ms){deadline}; "
            f"votes {votes}" + (f"; stopped early: {trace.early_stop}" if trace.early_stop else "")
        )
    sys.stdout.flush()
