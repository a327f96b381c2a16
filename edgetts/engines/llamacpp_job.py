"""One ``sample`` call on the llama.cpp engine as a resumable job: the state of its rows between decodes.

A :class:`Job` is what :meth:`LlamaCppEngine.sample` runs, split at every ``llama_decode`` so
that a caller can put several jobs into one batch (:mod:`edgetts.engines.batching`).  Its life:

1. :meth:`Job.prefill_entries` yields the prompt in chunks for the job's first sequence, with
   logits only for the prompt's last token; :meth:`Job.prefilled` then shares those cells with
   the job's other sequences (``llama_memory_seq_cp``) and points every row at the prompt's
   logits;
2. each round, :meth:`Job.step` samples one token for every live row from its output slot with
   the row's own native sampler chain, calls the controller (stop, force text, probe) and applies
   the token budgets; :meth:`Job.entries` then hands back every live row's pending tokens
   (the sampled one plus any forced text) for the next batch, remembering where each row's
   logits will be, and frees the cells of rows that finished;
3. when no row is live, :meth:`Job.result` closes the samplers and returns the rows.

The engine's single-call path runs one job alone, which is exactly the loop the engine always
ran; a scheduler runs many side by side.  The rows of a job depend only on its prompt, seeds and
controller, except for floating-point differences of a different batch around them.
"""

from __future__ import annotations

import codecs
import time

from edgetts.engines.base import Control, Controller, EngineError, Row, SampleResult, SamplingParams

OVERRUN_STEPS = 16  # at most this many more steps expected of a row past its usual length


class Job:
    def __init__(self, engine, prompt: str, n: int, params: SamplingParams, controller: Controller | None,
                 seeds: list[int] | None, seqs: list[int], started: float | None = None):  # fmt: skip
        if seeds is not None and len(seeds) != n:
            raise EngineError(f"got {len(seeds)} seeds for {n} rows")
        self.engine, self.lc = engine, engine.lc
        self.t0 = started if started is not None else time.perf_counter()
        self.ptoks = engine.tokenize(prompt, add_bos=engine.add_bos)
        if not self.ptoks:
            raise EngineError("the prompt is empty")
        rows = n if engine.kv_unified else 1  # a stream per row holds its own prompt and row
        if len(self.ptoks) + rows * params.max_tokens > (room := engine.n_ctx_seq):
            of = "" if engine.kv_unified else ", one row's stream"
            raise EngineError(
                f"prompt ({len(self.ptoks)} tokens) plus {rows} row(s) x {params.max_tokens} tokens exceeds the "
                f"context ({room} tokens{of}); raise n_ctx or lower n or max_tokens"
            )
        self.n, self.params, self.controller, self.seqs = n, params, controller, seqs
        seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
        self.rows = [Row(i, seeds[i]) for i in range(n)]
        self.ctl = Control(self.rows, self.t0)
        self.samplers: list = []
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]
        self.in_kv = [len(self.ptoks)] * n  # tokens of each sequence already in the cache
        self.pending: list[list[int]] = [[] for _ in range(n)]  # row tokens not yet decoded
        self.out_idx = [-1] * n  # batch output slot holding each row's next-token logits
        self.limit = [params.max_tokens] * n  # sampled-token budget per row (forcing may extend it)
        self.fed = 0  # prompt tokens handed out for prefill
        self.prefill_began = self.t0
        self.ttft: float | None = None
        self.steps = 0
        self.live = False  # prefilled, rows sampling
        self.sampled = False  # stepped since its last decode: its pending tokens wait for the next batch
        # Probes branch a row into scratch sequences: only a unified cache has them, and a scheduler
        # sharing the batch cannot let a branch decode on its own (it turns this off).
        self.allow_probes = engine.probes
        self.expected_tokens = getattr(controller, "expected_tokens", None)  # rows' usual length, if known

    # -- prefill ------------------------------------------------------------------------
    def prefill_entries(self, room: int) -> list[tuple[int, int, int, bool]]:
        """The next chunk of at most ``room`` prompt tokens (logits only for the prompt's last)."""
        chunk = self.ptoks[self.fed : self.fed + room]
        if self.fed == 0:
            self.prefill_began = time.perf_counter()
        start, self.fed = self.fed, self.fed + len(chunk)
        last = self.fed == len(self.ptoks)
        return [(t, start + j, self.seqs[0], last and j == len(chunk) - 1) for j, t in enumerate(chunk)]

    @property
    def prompt_done(self) -> bool:
        return self.fed == len(self.ptoks)

    def prefilled(self, logits_idx: int = -1) -> None:
        """The prompt is in the cache: share it with every row; rows sample from ``logits_idx`` first."""
        for s in self.seqs[1:]:
            self.lc.llama_memory_seq_cp(self.engine.mem, self.seqs[0], s, -1, -1)
        self.samplers = [self.engine._sampler(self.params, r.seed) for r in self.rows]
        self.out_idx = [logits_idx] * self.n
        self.live = True
        self.ctl.prefill_s = time.perf_counter() - self.prefill_began

    # -- one round ------------------------------------------------------------------------
    def step(self) -> None:
        """Sample every live row, run the controller, apply budgets."""
        lc, e, rows, params = self.lc, self.engine, self.rows, self.params
        stepped = []
        for r in rows:
            if r.finished:
                continue
            tok = lc.llama_sampler_sample(self.samplers[r.index], e.ctx, self.out_idx[r.index])
            now = time.perf_counter() - self.t0
            self.ttft = now if self.ttft is None else self.ttft
            if params.logprobs is not None:
                lp, top = e._logprobs(self.out_idx[r.index], tok, params.logprobs)
                r.logprobs.append(lp)
                r.top_logprobs.append(top)
            stepped.append(r.index)
            if lc.llama_vocab_is_eog(e.vocab, tok):
                r.finished, r.finish_reason = True, "stop"
                continue
            r.add(tok, self.decoders[r.index].decode(e.piece(tok)), False, now)
            self.pending[r.index].append(tok)
        if self.controller is not None:
            self._control(stepped)
        for i in stepped:
            if not rows[i].finished and rows[i].n_generated >= self.limit[i]:
                rows[i].finished, rows[i].finish_reason = True, "length"

    def _control(self, stepped: list[int]) -> None:
        ctl, rows, e = self.ctl, self.rows, self.engine
        self.controller(ctl, stepped)
        for i in ctl.retract:
            rows[i].pop_last()
            self.pending[i].pop()
        ctl.retract.clear()
        for i, text in ctl.pending.items():
            now = time.perf_counter() - self.t0
            for tok in e.tokenize(text):
                rows[i].add(tok, self.decoders[i].decode(e.piece(tok)), True, now)
                self.pending[i].append(tok)
            self.limit[i] += ctl.extra.get(i, 0)
        ctl.pending.clear()
        ctl.extra.clear()
        if ctl.probes:
            if not self.allow_probes:
                raise EngineError("probes need a unified cache and the engine to themselves (this engine has a cache "
                                  "stream per row, or shares its batch)")
            e._run_probes(ctl.probes, rows, self.seqs, self.in_kv, self.pending, self.params)
            ctl.probes.clear()

    def pending_tokens(self) -> int:
        return sum(len(self.pending[r.index]) for r in self.rows if not r.finished)

    def remaining_steps(self) -> int:
        """Decode steps the job still expects: what is left of its rows' usual length (the
        controller's ``expected_tokens``); a row past it is expected to end within a quarter of that
        length more (and within its limit).  Jumping to the hard limit there made the job's pace
        fall below one step, and, due first, it ran alone while every other job waited.  Without
        an expectation, the limit."""
        expected = self.expected_tokens
        left = 1
        for r in self.rows:
            if not r.finished:
                g, limit = r.n_generated, self.limit[r.index] - r.n_generated
                if not expected:
                    left = max(left, limit)
                elif g < expected:
                    left = max(left, min(limit, int(expected - g)))
                else:
                    left = max(left, min(limit, OVERRUN_STEPS, int(expected / 4) + 1))
        return left

    def entries(self, offset: int, room: int) -> list[tuple[int, int, int, bool]]:
        """Pending tokens of the live rows for a batch whose first entry lands at ``offset``.

        A row whose tokens would overflow the context (or the batch's ``room``) ends with
        ``length``; finished rows free their cache cells here, at once.
        """
        out = []
        for r in self.rows:
            if r.finished:
                continue
            toks = self.pending[r.index]
            if self.in_kv[r.index] + len(toks) >= self.engine.n_ctx_seq or len(out) + len(toks) > room:
                r.finished, r.finish_reason = True, "length"
                continue
            seq, pos = self.seqs[r.index], self.in_kv[r.index]
            out += [(tok, pos + j, seq, j == len(toks) - 1) for j, tok in enumerate(toks)]
            self.out_idx[r.index] = offset + len(out) - 1
            self.in_kv[r.index] += len(toks)
            self.pending[r.index] = []
        self.free_finished()
        return out

    def free_finished(self) -> None:
        if not self.seqs:  # never admitted: nothing in the cache
            return
        for r in self.rows:
            if r.finished and self.in_kv[r.index] >= 0:
                self.lc.llama_memory_seq_rm(self.engine.mem, self.seqs[r.index], -1, -1)
                self.in_kv[r.index] = -1  # freed

    def stop_live(self, reason: str) -> None:
        for r in self.rows:
            if not r.finished:
                r.finished, r.finish_reason = True, reason
        self.free_finished()

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.rows)

    def result(self) -> SampleResult:
        self.stop_live("length")
        self._free_samplers()
        for r, d in zip(self.rows, self.decoders):
            tail = d.decode(b"", final=True)
            if tail:
                r.pieces[-1] = r.pieces[-1] + tail if r.pieces else tail
        wall = time.perf_counter() - self.t0
        return SampleResult(self.rows, len(self.ptoks), self.ttft if self.ttft is not None else wall, wall, self.steps)

    def close(self) -> None:
        """Free native resources of a job abandoned mid-way (an error)."""
        self._free_samplers()
        self.stop_live("stopped")

    def _free_samplers(self) -> None:
        for s in self.samplers:
            self.lc.llama_sampler_free(s)
        self.samplers = []
