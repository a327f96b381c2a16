"""llama.cpp engine through llama-cpp-python's low-level API.

How :meth:`LlamaCppEngine.sample` works:

1. the prompt is tokenized and decoded once into sequence 0 of the KV cache (in chunks of
   ``n_batch``), with logits only for its last token;
2. ``llama_memory_seq_cp`` shares those cells with sequences ``1..n-1`` (no copy of data:
   cells carry a set of sequence ids), so every row starts from the same prefill;
3. each row owns a native sampler chain (top-k, top-p, min-p, temperature, then a seeded
   distribution draw; greedy at temperature 0) that samples its first token from the prompt
   logits and every later token from its own output slot;
4. each step puts every live row's pending tokens (the last sampled token, plus any forced
   text) into one ``llama_batch`` and calls ``llama_decode`` once; rows that end (end of
   generation token, token budget, controller stop) drop their cells with
   ``llama_memory_seq_rm`` so the others keep the cache.

The Python work per step is a few list operations per row; sampling runs in native code.
Log-probabilities, when asked for, read the row's logits through numpy.
The ``llama_cpp`` import happens in :meth:`LlamaCppEngine.__init__`, so importing this
module is cheap.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgetts.engines.base import Control, Controller, Engine, EngineError, Row, SampleResult, SamplingParams

GGUF_MAGIC = b"GGUF"
_backend_ready = False
_log_callback = None  # kept alive for as long as llama.cpp may call it
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5  # ggml_log_level values


def _set_log(lc, verbose: bool) -> None:
    """Route llama.cpp's log: everything when verbose, else errors only (and their continuations)."""
    global _log_callback
    last = [0]

    def log(level, text, _user):
        level = last[0] if level == GGML_LOG_CONT else level
        last[0] = level
        if verbose or level == GGML_LOG_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _log_callback = lc.llama_log_callback(log)
    lc.llama_log_set(_log_callback, ctypes.c_void_p(0))


def check_gguf(path: str | Path) -> Path:
    """``path`` if it is a readable GGUF file, else a one-line :class:`EngineError`."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{path}: no such file")
    if path.is_dir():
        raise EngineError(f"{path}: is a directory; the llama.cpp engine needs a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise EngineError(f"{path}: not a GGUF file (bad magic bytes)")
    return path


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    parallel_rows = True
    forced_tokens = True
    logprobs = True
    steppable = True
    probes = True
    options: ClassVar[dict[str, type]] = {
        "threads": int, "gpu_layers": int, "n_ctx": int, "flash_attn": bool, "n_batch": int,
    }  # fmt: skip

    @classmethod
    def open(cls, spec, plan) -> LlamaCppEngine:
        from edgetts.models import ModelNotFound, resolve_model

        try:
            path = resolve_model(spec.artifact)
        except ModelNotFound as e:
            raise EngineError(str(e)) from None
        o = spec.options
        return cls(path, n_ctx=o.get("n_ctx") or plan.n_ctx, n_threads=o.get("threads"),
                   n_gpu_layers=o.get("gpu_layers") or 0, flash_attn=o.get("flash_attn"),
                   max_rows=plan.max_rows, n_batch=o.get("n_batch") or 512)  # fmt: skip

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
        max_rows: int = 16,
        n_batch: int = 512,
        verbose: bool = False,
    ):
        global _backend_ready
        path = check_gguf(model_path)
        import llama_cpp as lc

        _set_log(lc, verbose)
        self.lc = lc
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise EngineError(f"{path}: llama.cpp could not load this model (unsupported or corrupt GGUF)")
        cp = lc.llama_context_default_params()
        # A step may carry forced text for every row at once, so the logical batch is sized
        # for that; llama.cpp splits it into physical micro-batches of n_batch.
        batch_cap = max(n_batch, max_rows * 64)
        cp.n_ctx = n_ctx
        cp.n_batch = batch_cap
        cp.n_ubatch = n_batch
        cp.n_seq_max = 2 * max_rows  # rows, then one scratch sequence per row for probes
        cp.n_threads = cp.n_threads_batch = n_threads or os.cpu_count() or 1
        cp.kv_unified = True  # rows share the prompt's cells and one pool of free cells
        cp.flash_attn_type = {None: -1, True: 1, False: 0}[flash_attn]
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise EngineError(f"{path}: could not create a context of {n_ctx} tokens (out of memory?)")
        self.path = path
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.max_rows = max_rows
        self.n_batch = n_batch
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self.mem = lc.llama_get_memory(self.ctx)
        self._batch = lc.llama_batch_init(batch_cap, 0, 1)
        self._batch_cap = batch_cap
        self._pieces: dict[int, bytes] = {}
        self._eog: list[int] | None = None
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode one token once, so the first request does not pay for buffer allocation."""
        self._decode([(self.lc.llama_vocab_bos(self.vocab), 0, 0, True)])
        self.lc.llama_memory_clear(self.mem, True)

    # -- text <-> tokens -------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self.lc.llama_token * cap)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (self.lc.llama_token * cap)()
            n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        p = self._pieces.get(token)
        if p is None:
            buf = ctypes.create_string_buffer(64)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            p = self._pieces[token] = buf.raw[:n]
        return p

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (for example ``general.name``), or None."""
        buf = ctypes.create_string_buffer(256)
        n = self.lc.llama_model_meta_val_str(self.model, key.encode(), buf, 256)
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def model_name(self) -> str | None:
        return self.meta("general.name")

    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF metadata, if any."""
        t = self.lc.llama_model_chat_template(self.model, None)
        return t.decode() if t else None

    # -- sampling ----------------------------------------------------------------------
    def _sampler(self, params: SamplingParams, seed: int):
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.ignore_eos:
            if self._eog is None:
                self._eog = [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self.vocab, t)]
            eog = self._eog
            bias = (lc.llama_logit_bias * len(eog))(*[lc.llama_logit_bias(t, float("-inf")) for t in eog])
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(eog), bias))
        if params.temperature == 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """Decode (token, pos, seq, wants_logits) entries; returns llama_decode's status."""
        b = self._batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(entries)
        return self.lc.llama_decode(self.ctx, b)

    def _logprobs(self, idx: int, token: int, k: int) -> tuple[float, dict[int, float]]:
        ptr = self.lc.llama_get_logits_ith(self.ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        top = {}
        if k:
            ids = np.argpartition(-logits, min(k, self.n_vocab - 1))[:k]
            top = {int(t): float(logits[t] - lse) for t in ids[np.argsort(-logits[ids])]}
        return float(logits[token] - lse), top

    def sample(
        self,
        prompt: str,
        n: int,
        params: SamplingParams,
        controller: Controller | None = None,
        seeds: list[int] | None = None,
    ) -> SampleResult:
        lc = self.lc
        if not 1 <= n <= self.max_rows:
            raise EngineError(f"n must be between 1 and {self.max_rows} (the engine's max_rows), got {n}")
        if seeds is not None and len(seeds) != n:
            raise EngineError(f"got {len(seeds)} seeds for {n} rows")
        t0 = time.perf_counter()
        ptoks = self.tokenize(prompt, add_bos=self.add_bos)
        if not ptoks:
            raise EngineError("the prompt is empty")
        if len(ptoks) + n * params.max_tokens > self.n_ctx:
            raise EngineError(
                f"prompt ({len(ptoks)} tokens) plus {n} rows x {params.max_tokens} tokens exceeds the "
                f"context of {self.n_ctx}; raise n_ctx or lower n or max_tokens"
            )
        lc.llama_memory_clear(self.mem, True)
        for start in range(0, len(ptoks), self.n_batch):
            chunk = ptoks[start : start + self.n_batch]
            last = start + len(chunk) == len(ptoks)
            ents = [(t, start + j, 0, last and j == len(chunk) - 1) for j, t in enumerate(chunk)]
            if self._decode(ents) != 0:
                raise EngineError(f"llama_decode failed on the prompt ({len(ptoks)} tokens)")
        for s in range(1, n):
            lc.llama_memory_seq_cp(self.mem, 0, s, -1, -1)

        seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
        rows = [Row(i, seeds[i]) for i in range(n)]
        samplers = [self._sampler(params, seeds[i]) for i in range(n)]
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]
        ctl = Control(rows, t0)
        in_kv = [len(ptoks)] * n  # tokens of each sequence already in the cache
        pending: list[list[int]] = [[] for _ in range(n)]  # row tokens not yet decoded
        out_idx = [-1] * n  # batch output slot holding each row's next-token logits
        limit = [params.max_tokens] * n  # sampled-token budget per row (forcing may extend it)
        ttft = None
        steps = 0
        try:
            while True:
                stepped = []
                for r in rows:
                    if r.finished:
                        continue
                    tok = lc.llama_sampler_sample(samplers[r.index], self.ctx, out_idx[r.index])
                    now = time.perf_counter() - t0
                    ttft = now if ttft is None else ttft
                    if params.logprobs is not None:
                        lp, top = self._logprobs(out_idx[r.index], tok, params.logprobs)
                        r.logprobs.append(lp)
                        r.top_logprobs.append(top)
                    if lc.llama_vocab_is_eog(self.vocab, tok):
                        r.finished, r.finish_reason = True, "stop"
                        stepped.append(r.index)
                        continue
                    self._append(r, tok, decoders[r.index], forced=False, t=now)
                    pending[r.index].append(tok)
                    stepped.append(r.index)
                if controller is not None:
                    controller(ctl, stepped)
                    for i in ctl.retract:
                        rows[i].pop_last()
                        pending[i].pop()
                    ctl.retract.clear()
                    for i, text in ctl.pending.items():
                        now = time.perf_counter() - t0
                        for tok in self.tokenize(text):
                            self._append(rows[i], tok, decoders[i], forced=True, t=now)
                            pending[i].append(tok)
                        limit[i] += ctl.extra.get(i, 0)
                    ctl.pending.clear()
                    ctl.extra.clear()
                    if ctl.probes:
                        self._run_probes(ctl.probes, rows, in_kv, pending, params)
                        ctl.probes.clear()
                for i in stepped:
                    if not rows[i].finished and rows[i].n_generated >= limit[i]:
                        rows[i].finished, rows[i].finish_reason = True, "length"
                entries, live = [], []
                for r in rows:
                    if r.finished:
                        continue
                    toks = pending[r.index]
                    if in_kv[r.index] + len(toks) >= self.n_ctx or len(entries) + len(toks) > self._batch_cap:
                        r.finished, r.finish_reason = True, "length"
                        continue
                    for j, tok in enumerate(toks):
                        entries.append((tok, in_kv[r.index] + j, r.index, j == len(toks) - 1))
                    out_idx[r.index] = len(entries) - 1
                    in_kv[r.index] += len(toks)
                    pending[r.index] = []
                    live.append(r.index)
                for r in rows:
                    if r.finished and in_kv[r.index] >= 0:
                        lc.llama_memory_seq_rm(self.mem, r.index, -1, -1)
                        in_kv[r.index] = -1  # freed
                if not live:
                    break
                status = self._decode(entries)
                steps += 1
                if status != 0:  # 1: no free cell in the cache; treat as running out of context
                    for i in live:
                        ctl.stop(i, "length")
                    break
        finally:
            for s in samplers:
                lc.llama_sampler_free(s)
        for r, d in zip(rows, decoders):
            tail = d.decode(b"", final=True)
            if tail:
                r.pieces[-1] = r.pieces[-1] + tail if r.pieces else tail
        wall = time.perf_counter() - t0
        return SampleResult(rows, len(ptoks), ttft if ttft is not None else wall, wall, steps)

    def _run_probes(self, probes, rows, in_kv, pending, params: SamplingParams) -> None:
        """Decode each probe in a scratch copy of its row's sequence, all probes batched together."""
        lc = self.lc
        live = []
        entries = []
        for j, (i, text, max_tokens, label, seed) in enumerate(probes):
            seq = self.max_rows + j
            lc.llama_memory_seq_cp(self.mem, i, seq, -1, -1)
            toks = pending[i] + self.tokenize(text)
            entries += [(t, in_kv[i] + k, seq, k == len(toks) - 1) for k, t in enumerate(toks)]
            live.append({"row": i, "label": label, "seq": seq, "pos": in_kv[i] + len(toks), "out": len(entries) - 1,
                         "max": max_tokens, "toks": [], "text": text, "smp": self._sampler(params, seed)})  # fmt: skip
        try:
            while live:
                if self._decode(entries) != 0:
                    break
                entries, still = [], []
                for p in live:
                    tok = lc.llama_sampler_sample(p["smp"], self.ctx, p["out"])
                    if lc.llama_vocab_is_eog(self.vocab, tok):
                        continue
                    p["toks"].append(tok)
                    if len(p["toks"]) >= p["max"]:
                        continue
                    entries.append((tok, p["pos"], p["seq"], True))
                    p["pos"] += 1
                    p["out"] = len(entries) - 1
                    still.append(p)
                done = [p for p in live if p not in still]
                for p in done:
                    self._finish_probe(p, rows)
                live = still
        finally:
            for p in live:
                self._finish_probe(p, rows)

    def _finish_probe(self, p: dict, rows) -> None:
        text = b"".join(self.piece(t) for t in p["toks"]).decode("utf-8", "replace")
        rows[p["row"]].probes[p["label"]] = (p["text"] + text, len(p["toks"]))
        self.lc.llama_memory_seq_rm(self.mem, p["seq"], -1, -1)
        self.lc.llama_sampler_free(p["smp"])

    def _append(self, r: Row, tok: int, dec, forced: bool, t: float) -> None:
        r.add(tok, dec.decode(self.piece(tok)), forced, t)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_batch_free(self._batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
