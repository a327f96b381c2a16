"""llama.cpp engine through llama-cpp-python's low-level API.

How :meth:`LlamaCppEngine.sample` works (the loop itself is :class:`~edgetts.engines.llamacpp_job.Job`,
so a scheduler can run several calls in one batch: :mod:`edgetts.engines.batching`):

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
Log-probabilities, when asked for, read the row's logits in place through numpy (float32, one
pass for the log-sum-exp, top-k among a few candidates; see :meth:`LlamaCppEngine._logprobs`).
The ``llama_cpp`` import happens in :meth:`LlamaCppEngine.__init__`, so importing this
module is cheap.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgetts.engines.base import Controller, Engine, EngineError, EngineFailure, SampleResult, SamplingParams, draw_seed
from edgetts.engines.llamacpp_job import Job
from edgetts.engines.offload import llama_gpu_layers, offloaded_layers
from edgetts.engines.spec import MAX_THREADS

GGUF_MAGIC = b"GGUF"
_backend_ready = False
_log_callback = None  # kept alive for as long as llama.cpp may call it
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5  # ggml_log_level values
MAX_SEQUENCES = 256  # llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ)
_held: list[str] | None = None  # while loading: llama.cpp's error lines, kept for our one-line error


def _set_log(lc, verbose: bool, watch=None) -> None:
    """Route llama.cpp's log: everything when verbose, else errors only (and their continuations).

    While a model loads, errors are held back instead (:func:`_holding_errors`): a failed load
    becomes one line that quotes llama.cpp's reason, and a good load prints what it held.
    ``watch`` sees every piece of text (a quantization's progress is in its info lines).  The
    callback never raises: an exception in a ctypes callback is only printed, never propagated.
    """
    global _log_callback
    last = [0]

    def log(level, text, _user):
        # See the docstring.  A Ctrl-C whose KeyboardInterrupt falls in here is dropped (by ctypes, if not
        # here): long commands that decode in the main thread remember the signal too (cli._interrupts).
        with contextlib.suppress(BaseException):
            _route(level, text)

    def _route(level, text):
        if watch is not None:
            watch(text.decode("utf-8", "replace"))
        level = last[0] if level == GGML_LOG_CONT else level
        last[0] = level
        if _held is not None and level == GGML_LOG_ERROR and not verbose:
            _held.append(text.decode("utf-8", "replace"))
        elif verbose or level == GGML_LOG_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _log_callback = lc.llama_log_callback(log)
    lc.llama_log_set(_log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def _holding_errors():
    """Hold llama.cpp's error lines; yields a function giving the first one (the cause, for a message)."""
    global _held
    _held = []
    held = _held

    def reason() -> str:
        lines = [line.strip() for line in "".join(held).splitlines() if line.strip()]
        if not lines:
            return ""
        cause = lines[0].split("error loading model: ", 1)[-1]  # llama.cpp's words after its prefix
        return f": {cause[:200]}"

    try:
        yield reason
    except BaseException:
        _held = None
        raise
    _held = None
    sys.stderr.write("".join(held))  # a load that went well: its error lines were only warnings


def context_size(spec, plan) -> int:
    """Cache cells for ``plan``: the spec's ``n_ctx`` if set, else the plan's; with a stream per row
    (``kv_unified: false``) every stream holds its own copy of the prompt."""
    o = spec.options
    if o.get("n_ctx"):
        return o["n_ctx"]
    return plan.n_ctx if o.get("kv_unified", True) else plan.split_n_ctx


def default_threads() -> int:
    """``EDGETTS_THREADS`` when set, else every core.

    On a machine that runs other work, fewer threads than cores is often faster: llama.cpp's
    threads wait for each other at every step, and one descheduled thread stalls them all.
    """
    env = os.environ.get("EDGETTS_THREADS", "")
    if env.strip():
        try:
            value = int(env)
        except ValueError:
            value = 0  # the same message as a number out of range
        if not 1 <= value <= MAX_THREADS:
            raise EngineError(f"EDGETTS_THREADS must be a whole number from 1 to {MAX_THREADS}, got {env!r}")
        return value
    return os.cpu_count() or 1


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
        "threads": int, "gpu_layers": int, "n_ctx": int, "flash_attn": bool, "n_batch": int, "kv_unified": bool,
    }  # fmt: skip

    @classmethod
    def open(cls, spec, plan) -> LlamaCppEngine:
        from edgetts.models import ModelNotFound, resolve_model

        try:
            path = resolve_model(spec.artifact)
        except ModelNotFound as e:
            raise EngineError(str(e)) from None
        o = spec.options
        return cls(path, n_ctx=context_size(spec, plan), n_threads=o.get("threads"),
                   n_gpu_layers=o.get("gpu_layers"), flash_attn=o.get("flash_attn"),
                   max_rows=plan.max_rows, n_batch=o.get("n_batch") or 512,
                   kv_unified=o.get("kv_unified", True))  # fmt: skip

    @classmethod
    def probes_for(cls, spec) -> bool:
        return cls.probes and spec.options.get("kv_unified", True)  # branches need a unified cache

    @classmethod
    def memory_plan(cls, spec, plan):
        """What :meth:`open` will allocate for ``plan``, from the GGUF header alone (nothing loaded)."""
        from edgetts.engines.memory import gguf_info, plan_memory
        from edgetts.models import ModelNotFound, resolve_model

        try:
            path = check_gguf(resolve_model(spec.artifact))
        except ModelNotFound as e:
            raise EngineError(str(e)) from None
        try:
            info = gguf_info(path)
        except EngineError:  # a header this reader does not know: llama.cpp may still load it,
            return None  # and its memory is then unknown, not refused
        o = spec.options
        return plan_memory(info, context_size(spec, plan), plan.max_rows, o.get("n_batch") or 512,
                           gpu_layers=offloaded_layers(o.get("gpu_layers"), info.layers),
                           kv_unified=o.get("kv_unified", True))  # fmt: skip

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        flash_attn: bool | None = None,
        max_rows: int = 16,
        n_batch: int = 512,
        verbose: bool = False,
        kv_unified: bool = True,
    ):
        global _backend_ready
        path = check_gguf(model_path)
        threads = n_threads or default_threads()
        if not 1 <= threads <= MAX_THREADS:
            raise EngineError(f"threads must be a whole number from 1 to {MAX_THREADS} (llama.cpp's limit), got "
                              f"{threads}")  # fmt: skip
        import llama_cpp as lc

        _set_log(lc, verbose)
        self.lc = lc
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True
        # Unified: rows share the prompt's cells and one pool of free cells, and there is one scratch
        # sequence per row for probes.  Split: each row its own stream of n_ctx / max_rows cells, so
        # a row attends over its own cells only (cheaper when many requests share a batch); no probes.
        n_seq = 2 * max_rows if kv_unified else max_rows
        if not 1 <= n_seq <= MAX_SEQUENCES:
            most = MAX_SEQUENCES // 2 if kv_unified else MAX_SEQUENCES
            raise EngineError(f"at most {most} rows fit one llama.cpp context, asked for {max_rows}")
        # llama.cpp sizes its logical batch, and the outputs it reserves, from the n_ctx asked for before
        # rounding it up to 256: below the sequences it holds, it aborts the process on the first decode.
        if n_ctx < max(256, n_seq):
            raise EngineError(f"n_ctx must be at least {max(256, n_seq)} for {max_rows} row(s), got {n_ctx}")
        if n_batch < 1:
            raise EngineError(f"n_batch must be at least 1 (0: the default, 512), got {n_batch}")
        self.probes = kv_unified
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = llama_gpu_layers(n_gpu_layers)  # auto: every layer where llama.cpp can offload
        with _holding_errors() as reason:
            self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
            if not self.model:
                raise EngineError(f"{path}: llama.cpp could not load this model (unsupported or corrupt GGUF)"
                                  f"{reason()}")  # fmt: skip
        cp = lc.llama_context_default_params()
        # A step may carry forced text for every row at once, so the logical batch is sized
        # for that; llama.cpp splits it into physical micro-batches of n_batch.
        batch_cap = max(n_batch, max_rows * 64)
        cp.n_ctx = n_ctx
        cp.n_batch = batch_cap
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = kv_unified
        cp.flash_attn_type = {None: -1, True: 1, False: 0}[flash_attn]
        cp.no_perf = True
        with _holding_errors() as reason:
            self.ctx = lc.llama_init_from_model(self.model, cp)
            if not self.ctx:
                lc.llama_model_free(self.model)
                why = reason() or " (out of memory?)"
                raise EngineError(f"{path}: could not create a context of {n_ctx} tokens{why}")
        self.path = path
        on_gpu = offloaded_layers(n_gpu_layers, lc.llama_model_n_layer(self.model))
        self._settings = {"threads": threads, "gpu_layers": on_gpu, "flash_attn": flash_attn,
                          "offload": "gpu" if on_gpu else "none"}  # fmt: skip
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.kv_unified = kv_unified
        self.n_ctx_seq = self.n_ctx if kv_unified else self.n_ctx // max_rows  # cells one row can use
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

    def settings(self) -> dict:
        """How this engine runs: threads, layers on the GPU (of ``layers + 1``), flash attention
        (None: llama.cpp decides) and ``offload`` (``gpu`` or ``none``)."""
        return dict(self._settings)

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
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(draw_seed(seed)))
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
        # Runs for every row at every step: over a 151,936-token vocabulary a float64 copy of the
        # logits and a full argpartition cost milliseconds, more than a decode step of a small model.
        # So the logits stay float32 in llama.cpp's buffer (no copy), the sum of exponentials
        # accumulates in float64, and top-k looks only at values >= the k-th largest maximum of
        # 64-token chunks (k chunks hold a value at least that large, so the k largest all pass).
        ptr = self.lc.llama_get_logits_ith(self.ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        m = float(logits.max())
        lse = m + math.log(float(np.exp(logits - m).sum(dtype=np.float64)))
        top = {}
        if k:
            k = min(k, self.n_vocab)
            chunks = logits.size // 64
            if chunks >= 4 * k:
                maxima = logits[: chunks * 64].reshape(chunks, 64).max(axis=1)
                ids = np.flatnonzero(logits >= np.partition(maxima, chunks - k)[chunks - k])
            else:
                ids = np.arange(logits.size)
            ids = ids[np.argsort(-logits[ids], kind="stable")][:k]
            top = {int(t): float(logits[t]) - lse for t in ids}
        return float(logits[token]) - lse, top

    def sample(
        self,
        prompt: str,
        n: int,
        params: SamplingParams,
        controller: Controller | None = None,
        seeds: list[int] | None = None,
    ) -> SampleResult:
        if not 1 <= n <= self.max_rows:
            raise EngineError(f"n must be between 1 and {self.max_rows} (the engine's max_rows), got {n}")
        job = Job(self, prompt, n, params, controller, seeds, seqs=list(range(n)))
        self.lc.llama_memory_clear(self.mem, True)
        try:
            while not job.prompt_done:
                if self._decode(job.prefill_entries(self.n_batch)) != 0:
                    raise EngineFailure(f"llama_decode failed on the prompt ({len(job.ptoks)} tokens)")
            job.prefilled()
            while True:
                job.step()
                entries = job.entries(0, self._batch_cap)
                if not entries:
                    break
                status = self._decode(entries)
                job.steps += 1
                if status != 0:  # 1: no free cell in the cache; treat as running out of context
                    job.stop_live("length")
                    break
        except BaseException:
            job.close()
            raise
        return job.result()

    def _run_probes(self, probes, rows, seqs, in_kv, pending, params: SamplingParams) -> None:
        """Decode each probe in a scratch copy of its row's sequence, all probes batched together."""
        lc = self.lc
        live = []
        entries = []
        for j, (i, text, max_tokens, label, seed) in enumerate(probes):
            seq = self.max_rows + j  # scratch sequences live above the rows' own
            lc.llama_memory_seq_cp(self.mem, seqs[i], seq, -1, -1)
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

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_batch_free(self._batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
