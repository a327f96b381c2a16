"""ONNX Runtime GenAI engine, for models made by onnxruntime-genai's model builder.

How it works: the prompt is tokenized with the model's own tokenizer (plus its BOS id from
``genai_config.json`` when the model expects one), repeated ``n`` times as one batch and
appended to a ``Generator`` whose search options carry the sampling settings.  Each
``generate_next_token`` decodes every row of the batch; the controller sees each step.

What it cannot do, and declares: rows are not seeded one by one (one seed per call), text
cannot be forced into a single row mid-generation, and no log-probabilities are reported;
the prompt is prefilled once per row (GenAI has no prefix sharing across a batch).
Stopping a row drops its further tokens; stopping all rows ends the call.

Execution providers: ``cpu`` (default), ``cuda`` and ``tensorrt-rtx``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgetts.engines.base import Control, Controller, Engine, EngineError, Row, SampleResult, SamplingParams

PROVIDERS = {"cpu": None, "cuda": "cuda", "tensorrt-rtx": "NvTensorRtRtx"}


class OnnxGenAIEngine(Engine):
    name = "onnx-genai"
    parallel_rows = True
    forced_tokens = False
    logprobs = False
    steppable = True

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

    def chat_template(self) -> str | None:
        cfg = self.path / "tokenizer_config.json"
        if cfg.is_file():
            return json.loads(cfg.read_text()).get("chat_template")
        return None

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
        og, np = self.og, self.np
        t0 = time.perf_counter()
        ids = ([self.bos] if self.add_bos else []) + self.tokenize(prompt)
        if len(ids) + params.max_tokens > self.context_length:
            raise EngineError(
                f"prompt ({len(ids)} tokens) plus {params.max_tokens} new tokens exceeds the model's "
                f"context of {self.context_length}"
            )
        seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
        gp = og.GeneratorParams(self.model)
        opts = {"max_length": len(ids) + params.max_tokens, "batch_size": n, "random_seed": seeds[0]}
        if params.temperature == 0:
            opts["do_sample"] = False
        else:
            opts.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        gp.set_search_options(**opts)
        gen = og.Generator(self.model, gp)
        gen.append_tokens(np.array([ids] * n, dtype=np.int32))
        rows = [Row(i, seeds[i]) for i in range(n)]
        streams = [self.tokenizer.create_stream() for _ in range(n)]  # handle multi-token characters
        ctl = Control(rows, t0)
        ttft, steps = None, 0
        while not gen.is_done() and not ctl.all_stopped and any(not r.finished for r in rows):
            gen.generate_next_token()
            steps += 1
            now = time.perf_counter() - t0
            ttft = now if ttft is None else ttft
            stepped = []
            for r, tok in zip(rows, gen.get_next_tokens()):
                if r.finished:
                    continue
                tok = int(tok)
                stepped.append(r.index)
                if tok in self.eos:
                    r.finished, r.finish_reason = True, "stop"
                    continue
                r.add(tok, streams[r.index].decode(tok), False, now)
                if r.n_generated >= params.max_tokens:
                    r.finished, r.finish_reason = True, "length"
            if controller is not None:
                controller(ctl, stepped)
                if ctl.pending:
                    raise EngineError("the onnx-genai engine cannot force text into a row (forced_tokens=False)")
        for r in rows:
            if not r.finished:
                r.finished, r.finish_reason = True, "length"
        wall = time.perf_counter() - t0
        return SampleResult(rows, len(ids), ttft if ttft is not None else wall, wall, steps)
