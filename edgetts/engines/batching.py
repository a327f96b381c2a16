"""Continuous batching: one running llama.cpp batch shared by many concurrent ``sample`` calls.

A :class:`Scheduler` owns a :class:`~edgetts.engines.llamacpp.LlamaCppEngine` and a thread that
runs rounds.  Each ``sample`` call becomes a :class:`~edgetts.engines.llamacpp_job.Job`:

* **admission**: a job waits in the queue, earliest deadline first, until it can get ``n`` free
  sequences and its planned cache cells (its prompt, plus ``n`` rows of ``max_tokens`` and
  forced text); a job that could never fit is refused at once with :class:`EngineError`.  A
  queued job whose controller says it expired (cancelled, or its deadline no longer leaves room
  for an answer) is dropped while queued: it returns rows that never started, finished
  ``deadline`` or ``cancelled``.
* **a round**: every job whose rows were in the last decode samples them and runs its own
  controller (its strategy, seeds and deadline).  Then the round is composed earliest deadline
  first: a job joins only while the decode stays fast enough for every job already in it to
  finish on time at its expected pace.  On a compute-bound device a step costs about its
  tokens, so an urgent row beside thirty others would be late; the others keep their sampled
  tokens and join a later round, when the urgent ones are done or their own deadline comes
  first.  A new job's prompt joins in chunks the round can afford (``prefill_chunk`` at most
  while rows are decoding, so running rows never stall behind a long prompt); one
  ``llama_decode`` runs it all.  Rows that finish drop their cells at once; a job whose rows
  all finished returns its result and frees its sequences and its planned cells.
* **failures** stay inside their job: a controller that raises fails its own call; a decode
  that fails ends the rows of that round with ``length``; the loop goes on.

The thread is the only one touching the llama.cpp context; callers block on a future.  The
scheduler records the time of each round (sampling, controllers and the decode) against the
tokens decoded in it, and how much slower than at the start the device runs them
(:class:`~edgetts.engines.speed.DeviceSpeed`); from those it answers admission's questions about the batch
(:meth:`Scheduler.cost_ms`, :meth:`Scheduler.fits`, :meth:`Scheduler.work_ms`), so that what
admits a request and what then runs it share one model of the batch.
:class:`BatchedEngine` is the :class:`~edgetts.engines.base.Engine` face of a scheduler, so
strategies run on it unchanged.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from edgetts.engines.base import Controller, Engine, EngineError, EngineFailure, SampleResult, SamplingParams
from edgetts.engines.llamacpp_job import Job
from edgetts.engines.spec import FORCED_SLACK
from edgetts.engines.speed import DeviceSpeed, StepCost
from edgetts.timing import ANSWER_ROUNDS, ANSWER_SAFETY, MARGIN, SHARE_ROWS

MIN_CHUNK = 8  # prompt tokens a starting job gets in a round, however tight the others' pace
# Rounds before its end from which a job is in every round: a few more than its controller needs to force
# and state an answer (ANSWER_ROUNDS, with the controllers' safety factor); the stall the batch expects
# comes on top, as it does in the controllers' own margin.
LAST_CHANCE_ROUNDS = (ANSWER_ROUNDS + 1) * ANSWER_SAFETY


@dataclass
class _Entry:
    job: Job
    cells: int  # planned cache cells
    future: Future
    due: float = math.inf  # when its caller needs it done (perf_counter seconds)
    # The controller's ``expired(min_s)``: why the call should not run on (cancelled, or its
    # deadline leaves less than ``min_s``), or None; looked up once, asked every round.
    expired: Callable[[float], str | None] | None = None


class Scheduler:
    def __init__(self, engine, prefill_chunk: int = 64):
        self.engine = engine
        self.prefill_chunk = prefill_chunk
        self.free_seqs = list(range(engine.max_rows))
        self.free_cells = engine.n_ctx
        self.queue: deque[_Entry] = deque()
        self.running: list[_Entry] = []
        self.cond = threading.Condition()
        self.closed = False
        self.cost = StepCost()  # seconds of a round against the tokens decoded in it
        self.dead: BaseException | None = None  # what stopped the batch thread, if anything did
        self.speed = DeviceSpeed()
        # The jobs of each decode (ids of their Job objects), the last TRACE_ROUNDS, when asked for
        # (``trace_rounds()``): how tests and diagnostics see that requests really share rounds.
        self.trace: deque | None = None
        self._fit = (0.0, 0.0)
        # Tokens of a typical recent round (a mean over about ten): what a call's first steps are priced at.
        # Not the last round alone: a call's first step follows its own prompt's prefill, a round of
        # dozens of tokens, and a step priced like it forced the answer of a tight call at once.
        self.round_tokens = 1.0
        self._calibrate()
        self.thread = threading.Thread(target=self._loop, name="edgetts-batch", daemon=True)
        self.thread.start()

    def _calibrate(self, repeats: int = 4) -> None:
        """Time decodes of 1 and of ``max_rows`` tokens, so admission has step costs before any request."""
        e = self.engine
        bos = e.lc.llama_vocab_bos(e.vocab)
        for _ in range(repeats):
            for width in (1, e.max_rows):
                t = time.perf_counter()
                e._decode([(bos, 0, s, True) for s in range(width)])
                self._record(width, time.perf_counter() - t, served=False)
                e.lc.llama_memory_clear(e.mem, True)

    # -- the callers' side -----------------------------------------------------------------
    def submit(self, prompt: str, n: int, params: SamplingParams, controller: Controller | None = None,
               seeds: list[int] | None = None) -> Future:  # fmt: skip
        if not 1 <= n <= self.engine.max_rows:
            raise EngineError(f"n must be between 1 and {self.engine.max_rows} (the engine's max_rows), got {n}")
        job = Job(self.engine, prompt, n, params, controller, seeds, seqs=[], started=None)
        job.allow_probes = False
        # Unified cache: the prompt once plus every row; a stream per row: each stream is its own.
        cells = len(job.ptoks) + n * (params.max_tokens + FORCED_SLACK) if self.engine.kv_unified else 0
        if cells > self.engine.n_ctx:
            raise EngineError(f"this request needs {cells} cache cells; the engine has {self.engine.n_ctx}")
        due = getattr(controller, "due", None)
        entry = _Entry(job, cells, Future(), (due() if due else None) or math.inf, getattr(controller, "expired", None))
        with self.cond:
            if self.closed:
                raise EngineFailure("the engine is closed")
            if not self.thread.is_alive():
                raise EngineFailure(f"the batch thread is gone ({self.dead!r})")
            self.queue.append(entry)
            self.cond.notify()
        return entry.future

    def load(self) -> tuple[int, int]:
        """(rows running, rows queued) right now."""
        with self.cond:
            return sum(e.job.n for e in self.running), sum(e.job.n for e in self.queue)

    def step_fit(self) -> tuple[float, float]:
        """(seconds a round costs, seconds each token adds), as fitted online."""
        return self._fit

    def step_cost(self, tokens: int) -> float:
        """Predicted seconds of one round carrying ``tokens`` tokens: its sampling, controllers and decode
        (a + b x tokens, fitted online on whole rounds, from bare decodes timed at start)."""
        a, b = self._fit
        return a + b * tokens

    # -- the batch's model of itself, for admission -------------------------------------------
    # ``busy``: the requests admitted to this engine, as (end: perf_counter s, time alone: ms, rows), the
    # end being the one their controllers stop at and this batch orders by (``Deadline.end``).
    # A request counts whole until it ends: under earliest-deadline-first rounds its progress so far
    # depends on who came after it, and guessing it from the time it has had admitted more than the
    # engine could run.
    def _fit_or_guess(self) -> tuple[float, float]:
        a, b = self._fit  # before anything is measured: the compute-bound guess that a step costs its rows
        return (a, b) if a + b > 0 else (0.0, 1.0)

    def cost_ms(self, solo_ms: float, n: int, busy: list[tuple[float, float, int]], end: float) -> float:
        """Predicted latency of a request of ``n`` rows (``solo_ms`` alone, at profile speed) beside ``busy``,
        ending at ``end``: only rows ending earlier slow its rounds (rounds go earliest deadline first),
        beyond the engine's rows requests wait their turn, the device runs at its speed now and a stall of
        the device's recent ones is met once (:class:`~edgetts.engines.speed.DeviceSpeed`)."""
        ahead = sum(r for d, _, r in busy if d <= end)
        waves = math.ceil((sum(r for *_, r in busy) + n) / self.engine.max_rows)
        a, b = self._fit_or_guess()
        rows = min(ahead + n, self.engine.max_rows)
        return solo_ms * self.slowdown() * waves * (a + b * rows) / (a + b * n) + 1000 * self.speed.stall_s()

    def work_ms(self, solo_ms: float, n: int) -> float:
        """Engine time a request of ``n`` rows takes in the shared batch: its time alone scaled to its rows'
        share of a round of ``SHARE_ROWS`` rows, at the device's speed now."""
        a, b = self._fit_or_guess()
        return self.slowdown() * solo_ms * (b * n + a * n / SHARE_ROWS) / (a + b * n)

    def fits(self, solo_ms: float, n: int, busy: list[tuple[float, float, int]], end: float, now: float) -> bool:
        """Whether the batch can still finish everything on time with this request added (its run ending at
        ``end``): for each end from the new one's on, the work due by then (every admitted request's and
        the new one's, :meth:`work_ms`) must fit in the time left, with admission's margin and a stall."""
        items = sorted([(d, self.work_ms(ms, r)) for d, ms, r in busy] + [(end, self.work_ms(solo_ms, n))])
        total, stall_ms = 0.0, 1000 * self.speed.stall_s()
        for at, w in items:
            total += w
            if at >= end and total * MARGIN + stall_ms > (at - now) * 1000:
                return False
        return True

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # -- the thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a fault outside any job's code: nothing may wait on this thread
            self.dead = e
            with self.cond:
                for entry in list(self.queue) + self.running:
                    self._fail(entry, EngineFailure(f"the batch thread stopped: {e!r}"))
                self.queue.clear()
                self.running = []
            sys.stderr.write(f"edgetts: the batch thread stopped ({e!r}); requests to this engine get 503\n")

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.queue and not self.running:
                    self.cond.wait()
                if self.closed:
                    for entry in list(self.queue) + self.running:
                        self._fail(entry, EngineFailure("the engine closed"))
                    self.queue.clear()
                    self.running = []
                    return
                self._admit()
            try:
                self._round()
            except Exception as e:  # the batch must survive: end this round's jobs with the error
                for entry in list(self.running):
                    self._fail(entry, e)
                self.running = []
                self.engine.lc.llama_memory_clear(self.engine.mem, True)
                self.free_seqs = list(range(self.engine.max_rows))
                self.free_cells = self.engine.n_ctx

    def _admit(self) -> None:
        rows = sum(x.job.n for x in self.running)  # a round's tokens: about one a row
        for entry in list(self.queue):
            # a queued job needs the rounds that state an answer still ahead of its deadline
            try:
                reason = entry.expired and entry.expired(ANSWER_ROUNDS * self.step_cost(rows + entry.job.n))
            except Exception as e:  # its controller's fault: that job ends, the others go on
                self.queue.remove(entry)
                self._fail(entry, e)
                continue
            if reason:
                self.queue.remove(entry)
                entry.job.stop_live(reason)  # never started: no cells, no samplers
                entry.future.set_result(entry.job.result())
        while self.queue:
            entry = min(self.queue, key=lambda x: x.due)  # earliest deadline first (ties: first come)
            if len(self.free_seqs) < entry.job.n or self.free_cells < entry.cells:
                return  # later deadlines wait behind it, so a wide job is not passed by narrow ones forever
            self.queue.remove(entry)
            entry.job.seqs = [self.free_seqs.pop(0) for _ in range(entry.job.n)]
            self.free_cells -= entry.cells
            self.running.append(entry)

    def _round(self) -> None:
        e = self.engine
        begin = time.perf_counter()  # the whole round is what a request waits for: sampling and controllers too
        for entry in list(self.running):
            reason = entry.expired and entry.expired(0.0)
            if reason and (not entry.job.live or entry.job.sampled):  # left out of rounds until too late:
                entry.job.stop_live(reason)  # its controller never ran to stop it, so stop it here
                self._finish(entry)
        a, b = self._fit  # a round like the recent ones, as fitted, and the device's stalls: the controllers' priors
        step_s, stall_s = a + b * self.round_tokens, self.speed.stall_s()
        for entry in list(self.running):
            job = entry.job
            if job.live and not job.sampled:  # only right after a decode that held its rows' logits
                try:
                    job.ctl.step_s, job.ctl.stall_s = step_s, stall_s
                    job.step()
                    job.sampled = True
                except Exception as err:  # a controller's failure is its own call's
                    self._fail(entry, err)
        entries: list = []
        decoded, fed, prefills = [], [], []  # jobs with rows, jobs with prompt, in this decode
        chosen = self._compose(begin)
        for entry, _ in chosen:  # decoding rows first: a prompt chunk must never crowd them out
            job = entry.job
            if job.live:
                more = job.entries(len(entries), e._batch_cap - len(entries))
                if more:
                    decoded.append(job)
                entries += more
        for entry, room in chosen:
            job = entry.job
            if job.live:
                continue
            room = min(room if entries else e.n_batch, e._batch_cap - len(entries))
            if room > 0:
                entries += job.prefill_entries(room)
                fed.append(job)
                if job.prompt_done:
                    prefills.append((job, len(entries) - 1))
        for entry in [x for x in self.running if x.job.live and x.job.done]:
            self._finish(entry)
        if not entries:
            return
        status = e._decode(entries)
        self._record(len(entries), time.perf_counter() - begin)
        self.round_tokens += 0.1 * (len(entries) - self.round_tokens)
        if self.trace is not None:  # who shared this decode: the jobs whose rows or prompt were in it
            self.trace.append(tuple(id(j) for j in decoded + fed))
        for job in decoded:
            job.steps += 1
            job.sampled = False
        if status != 0:  # no free cell after all: end the jobs of this round, never the loop
            for entry in [x for x in self.running if x.job in decoded or x.job in fed]:
                entry.job.stop_live("length")
                if entry.job.live:
                    self._finish(entry)
                else:
                    self._fail(entry, EngineFailure("llama_decode failed on the prompt (the cache is full)"))
            return
        for job, idx in prefills:
            job.prefilled(idx)

    def _compose(self, now: float) -> list[tuple[_Entry, int]]:
        """Who decodes this round, earliest deadline first: each job joins only while the round stays
        fast enough for every job already in it to finish on time at its expected pace (a decode
        step costs about its tokens on a compute-bound device, so a crowded round would make an
        urgent row late); a job left out keeps its sampled tokens for a later round.  A job still
        prefilling gets a prompt chunk the round can afford (at least a few tokens, so it starts).
        Returns (entry, prompt tokens it may prefill)."""
        jobs = sorted((x for x in self.running if not x.job.done), key=lambda x: x.due)
        chosen, tokens, pace, starting = [], 0, math.inf, False
        # A wait like the device's recent ones: controllers force their answers that much earlier
        # (the expected stall is in their margin), so a job's last rounds begin that much earlier too.
        stall = self.speed.stall_s()
        for entry in jobs:
            job = entry.job
            # its pace: the time left over the steps it expects (1.5x that margin measured no better)
            own = (entry.due - now) / (job.remaining_steps() + (0 if job.live else 1))
            if job.live:
                width = job.pending_tokens()
            else:  # the prompt chunk that keeps the round within the pace of the jobs in it
                width = self.prefill_chunk
                while width > MIN_CHUNK and chosen and self.step_cost(tokens + width) > pace:
                    width //= 2
                if not starting:  # the earliest prompt always moves on: paces are estimates, a wait is not
                    starting = True
                    chosen.append((entry, width))
                    tokens, pace = tokens + width, min(pace, own)
                    continue
            # A live job whose end is within the rounds its answer needs gets this round whatever the others'
            # pace: left out until then, its controller would never run to force its answer, and it would
            # end with nothing said.  It does not set the pace for the jobs due after it.
            cost = self.step_cost(tokens + width)
            last = job.live and entry.due - now <= LAST_CHANCE_ROUNDS * cost + stall
            if chosen and cost > min(pace, own) and not last:
                continue
            chosen.append((entry, width))
            tokens += width
            if not last:
                pace = min(pace, own)
        return chosen

    def _record(self, tokens: int, seconds: float, served: bool = True) -> None:
        self.cost.add(tokens, seconds)
        self._fit = self.cost.fit()  # every round: a few float operations, and the machine's load drifts
        if served:
            self.speed.add(tokens, seconds, self._fit)

    def slowdown(self) -> float:
        """The device's speed now against when serving began (:class:`DeviceSpeed`); at least 1."""
        return self.speed.slowdown()

    def trace_rounds(self, rounds: int = 10_000) -> deque:
        """Start keeping, for each of the last ``rounds`` decodes, the ids of the jobs in it."""
        self.trace = deque(maxlen=rounds)
        return self.trace

    def _release(self, entry: _Entry) -> None:
        if entry in self.running:
            self.running.remove(entry)
        self.free_seqs += entry.job.seqs
        self.free_seqs.sort()
        self.free_cells += entry.cells

    def _finish(self, entry: _Entry) -> None:
        self._release(entry)
        entry.future.set_result(entry.job.result())

    def _fail(self, entry: _Entry, err: BaseException) -> None:
        entry.job.close()
        if entry in self.running:
            self._release(entry)
        if not entry.future.done():
            entry.future.set_exception(err)


class BatchedEngine(Engine):
    """The engine face of a :class:`Scheduler`: ``sample`` joins the running batch and waits."""

    name = "llama.cpp"
    parallel_rows = True
    forced_tokens = True
    logprobs = True
    steppable = True
    probes = False  # a branch decodes on its own, which a shared batch cannot allow
    thread_safe = True

    def __init__(self, engine, prefill_chunk: int = 64):
        self.inner = engine
        self.scheduler = Scheduler(engine, prefill_chunk)

    def sample(self, prompt, n, params, controller=None, seeds=None) -> SampleResult:
        future = self.scheduler.submit(prompt, n, params, controller, seeds)
        while True:  # never wait on a thread that is gone
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not self.scheduler.thread.is_alive() and not future.done():
                    raise EngineFailure(f"the batch thread is gone ({self.scheduler.dead!r})") from None

    def healthy(self) -> str | None:
        """None while the batch thread runs, else why it is gone."""
        return None if self.scheduler.thread.is_alive() else f"batch thread gone: {self.scheduler.dead!r}"

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def chat_template(self) -> str | None:
        return self.inner.chat_template()

    def model_name(self) -> str | None:
        return self.inner.model_name()

    def settings(self) -> dict:
        return self.inner.settings()

    def close(self) -> None:
        self.scheduler.close()
        self.inner.close()
