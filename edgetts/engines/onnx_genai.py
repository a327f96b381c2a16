"""ONNX Runtime GenAI engine, for models made by onnxruntime-genai's model builder.

How it works: the prompt is tokenized with the model's own tokenizer (plus its BOS id from
``genai_config.json`` when the model expects one).  Each row gets its own ``Generator``
(batch size 1) whose search options carry the sampling settings and the row's seed, and the
prompt is appended to it.  A step calls ``generate_next_token`` on every live row; the
controller sees each step.  Forced text (the end of thinking and the answer prefix at a
budget) is tokenized and appended to that row's generator with ``append_tokens``; its
next token is then sampled after it, as in the llama.cpp engine.

Why one generator per row: GenAI appends tokens to a whole batch at once (every row the same
count), so text forced into one row, and one seed per row, need a row of its own.  The cost,
declared as ``parallel_rows = False``: the prompt is prefilled once per row and rows decode one
after another, not in one batch.  Not supported, and declared: log-probabilities and probes
(pooled profiling runs these cells directly).  Stopping a row drops its generator.

Execution providers: ``cpu`` (default), ``cuda`` and ``tensorrt-rtx``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar

from edgetts.engines.base import Control, Controller, Engine, EngineError, Row, SampleResult, SamplingParams

PROVIDERS = {"cpu": None, "cuda": "cuda", "tensorrt-rtx": "NvTensorRtRtx"}


class OnnxGenAIEngine(Engine):
    name = "onnx-genai"
    parallel_rows = False  # one generator per row (see the module docstring)
    forced_tokens = True
    logprobs = False
    steppable = True
    options: ClassVar[dict[str, type]] = {"provider": str}

    @classmethod
    def open(cls, spec, plan) -> OnnxGenAIEngine:
        from edgetts.models import BUILTIN_ONNX

        path = BUILTIN_ONNX.get(spec.artifact, spec.artifact)
        return cls(path, provider=spec.options.get("provider") or "cpu")

    def __init__(self, model_dir: str | Path, provider: str = "cpu"):
        model_dir = Path(model_dir)
        cfg_path = model_dir / "genai_config.json"
        if not cfg_path.is_file():
            raise EngineError(f"{model_dir}: no genai_config.json; build the model with onnxruntime-genai's builder")
        if provider not in PROVIDERS:
            raise EngineError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
        import numpy as np
        import onnxruntime_genai as og

        self.og, self.np = og, np
        cfg = json.loads(cfg_path.read_text())["model"]
        self.context_length = int(cfg.get("context_length", 2048))
        eos = cfg.get("eos_token_id", [])
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.bos = cfg.get("bos_token_id")
        try:
            config = og.Config(str(model_dir))
            config.clear_providers()
            if PROVIDERS[provider]:
                config.append_provider(PROVIDERS[provider])
            self.model = og.Model(config)
        except Exception as e:  # GenAI raises plain RuntimeError or OrtException
            raise EngineError(f"{model_dir}: onnxruntime-genai could not load it ({str(e).splitlines()[0]})") from None
        self.tokenizer = og.Tokenizer(self.model)
        self.path = model_dir
        probe = list(self.tokenizer.encode("a"))
        self.add_bos = self.bos is not None and (not probe or probe[0] != self.bos)

    def _tokenizer_config(self) -> dict:
        cfg = self.path / "tokenizer_config.json"
        try:
            data = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def chat_template(self) -> str | None:
        template = self._tokenizer_config().get("chat_template")
        return template if isinstance(template, str) else None

    def model_name(self) -> str | None:
        """``name_or_path`` of ``tokenizer_config.json`` (the builder copies it from the source model)."""
        name = self._tokenizer_config().get("name_or_path")
        return name if isinstance(name, str) else None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def sample(
        self,
        prompt: str,
        n: int,
        params: SamplingParams,
        controller: Controller | None = None,
        seeds: list[int] | None = None,
    ) -> SampleResult:
        if n < 1:
            raise EngineError(f"n must be at least 1, got {n}")
        np = self.np
        t0 = time.perf_counter()
        ids = ([self.bos] if self.add_bos else []) + self.tokenize(prompt)
        if len(ids) + params.max_tokens > self.context_length:
            raise EngineError(
                f"prompt ({len(ids)} tokens) plus {params.max_tokens} new tokens exceeds the model's "
                f"context of {self.context_length}"
            )
        if seeds is not None and len(seeds) != n:
            raise EngineError(f"got {len(seeds)} seeds for {n} rows")
        seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
        # Room for forced text too: the answer prefix and a few extensions per row.
        max_length = min(self.context_length, len(ids) + params.max_tokens + 64)
        gens = [self._generator(ids, params, seed, max_length) for seed in seeds]
        rows = [Row(i, seeds[i]) for i in range(n)]
        streams = [self.tokenizer.create_stream() for _ in range(n)]  # handle multi-token characters
        limit = [params.max_tokens] * n  # sampled-token budget per row (forcing may extend it)
        ctl = Control(rows, t0)
        ttft, steps = None, 0
        while not ctl.all_stopped and any(not r.finished for r in rows):
            stepped = []
            for r in rows:
                if r.finished:
                    continue
                g = gens[r.index]
                if g.is_done():
                    r.finished, r.finish_reason = True, "length"
                    continue
                g.generate_next_token()
                tok = int(g.get_next_tokens()[0])
                now = time.perf_counter() - t0
                ttft = now if ttft is None else ttft
                stepped.append(r.index)
                if tok in self.eos:
                    r.finished, r.finish_reason = True, "stop"
                    continue
                r.add(tok, streams[r.index].decode(tok), False, now)
            steps += 1
            if controller is not None:
                controller(ctl, stepped)
                if ctl.retract:
                    raise EngineError("the onnx-genai engine cannot replace a sampled token")
                for i, text in ctl.pending.items():
                    toks = self.tokenize(text)
                    if toks and not rows[i].finished:
                        now = time.perf_counter() - t0
                        for tok in toks:
                            rows[i].add(tok, streams[i].decode(tok), True, now)
                        try:
                            gens[i].append_tokens(np.array([toks], dtype=np.int32))
                        except Exception as e:  # GenAI raises RuntimeError when the row's length is used up
                            why = str(e).splitlines()[0]
                            raise EngineError(f"onnx-genai could not append forced text ({why})") from None
                    limit[i] += ctl.extra.get(i, 0)
                ctl.pending.clear()
                ctl.extra.clear()
            for i in stepped:
                if not rows[i].finished and rows[i].n_generated >= limit[i]:
                    rows[i].finished, rows[i].finish_reason = True, "length"
            for r in rows:
                if r.finished and gens[r.index] is not None:
                    gens[r.index] = None  # free the row's cache at once
        for r in rows:
            if not r.finished:
                r.finished, r.finish_reason = True, r.finish_reason or "stopped"
        wall = time.perf_counter() - t0
        return SampleResult(rows, len(ids), ttft if ttft is not None else wall, wall, steps)

    def _generator(self, ids: list[int], params: SamplingParams, seed: int, max_length: int):
        og, np = self.og, self.np
        gp = og.GeneratorParams(self.model)
        opts = {"max_length": max_length, "batch_size": 1, "random_seed": seed & 0x7FFFFFFF}
        if params.temperature == 0:
            opts["do_sample"] = False
        else:
            opts.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        gp.set_search_options(**opts)
        gen = og.Generator(self.model, gp)
        gen.append_tokens(np.array([ids], dtype=np.int32))
        return gen
