"""An engine over any OpenAI-compatible completions server (llama-server, vLLM, TensorRT-LLM, Ollama).

Use it when the model outgrows the device and already runs behind a serving engine.  The
server cannot be stepped, so this engine offers fewer controls:

* parallel samples: one request per row, sent concurrently with per-row seeds (servers with
  several slots decode them together), or ``parallel="n"``: one request with ``n`` choices
  (cheaper where supported, but seeds are then per request, not per row);
* budgets: ``max_tokens``;
* forcing: after a round of requests the controller runs once over all rows; a row it forces
  text into is continued by a second request whose prompt is the original prompt, the row's
  text so far and the forced text.  Rounds repeat while the controller forces (at most
  ``max_rounds``).

Token counts come from the server's ``usage`` (exact per row in the per-request mode).
``httpx`` is imported when the engine is constructed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from edgetts.engines.base import Control, Controller, Engine, EngineError, Row, SampleResult, SamplingParams


class OpenAIHTTPEngine(Engine):
    name = "openai-http"
    parallel_rows = True
    forced_tokens = True  # between requests, not mid-request
    logprobs = False
    steppable = False

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key: str | None = None,
        parallel: str = "requests",
        timeout: float = 600.0,
        max_rounds: int = 4,
    ):
        import httpx

        if parallel not in ("requests", "n"):
            raise EngineError(f"parallel must be 'requests' or 'n', got {parallel!r}")
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.model = model
        self.parallel = parallel
        self.max_rounds = max_rounds
        self._httpx = httpx

    def _post(self, body: dict) -> dict:
        try:
            r = self.client.post("/completions", json=body)
        except self._httpx.HTTPError as e:
            raise EngineError(f"{self.base_url}: request failed ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise EngineError(f"{self.base_url}/completions answered {r.status_code}: {r.text[:200]}")
        return r.json()

    def _body(self, prompt: str, params: SamplingParams, max_tokens: int, seed: int | None, n: int = 1) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
        }
        if seed is not None:
            body["seed"] = seed
        if params.top_k:
            body["top_k"] = params.top_k  # a common extension (llama-server, vLLM)
        if params.min_p:
            body["min_p"] = params.min_p
        return body

    def tokenize(self, text: str) -> list[int]:
        raise EngineError("the OpenAI HTTP engine cannot tokenize locally; budgets are in server tokens")

    def count_tokens(self, text: str) -> int:
        """A rough count (4 characters a token) for local bookkeeping only."""
        return max(1, len(text) // 4)

    def _round(self, prompt: str, rows: list[Row], params: SamplingParams, budgets: list[int], t0: float) -> None:
        """One request per row (or one with n choices) continuing each row's text."""
        if self.parallel == "n" and all(not r.text for r in rows):
            out = self._post(self._body(prompt, params, budgets[0], params.seed, n=len(rows)))
            per_row = (out.get("usage", {}).get("completion_tokens") or 0) // max(1, len(rows))
            for r, ch in zip(rows, sorted(out["choices"], key=lambda c: c.get("index", 0))):
                self._extend(r, ch, per_row, t0)
            return

        def one(k):
            r = rows[k]
            return self._post(self._body(prompt + r.text, params, budgets[k], r.seed))

        with ThreadPoolExecutor(max(1, len(rows))) as pool:
            outs = list(pool.map(one, range(len(rows))))
        for r, out in zip(rows, outs):
            self._extend(r, out["choices"][0], out.get("usage", {}).get("completion_tokens") or 0, t0)

    @staticmethod
    def _extend(r: Row, choice: dict, n_tokens: int, t0: float) -> None:
        now = time.perf_counter() - t0
        text = choice.get("text") or ""
        # One entry per server token is unknowable here; keep the text as one piece and
        # the count as sampled placeholders so budgets and counts stay right.
        r.pieces.append(text)
        r.tokens.extend([-1] * n_tokens)
        r.forced.extend([False] * n_tokens)
        r.times.extend([now] * n_tokens)
        r.n_generated += n_tokens
        r.finish_reason = "stop" if choice.get("finish_reason") == "stop" else "length"

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
        t0 = time.perf_counter()
        seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
        rows = [Row(i, seeds[i]) for i in range(n)]
        active = list(rows)
        budgets = [params.max_tokens] * n
        ttft = None
        for _ in range(self.max_rounds):
            self._round(prompt, active, params, budgets, t0)
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            if controller is None:
                break
            ctl = Control(rows, t0)
            for r in rows:  # a row cut by its budget stays open so the controller may force it
                r.finished = r.finish_reason == "stop" or r not in active
            controller(ctl, [r.index for r in active])
            for i, text in ctl.pending.items():
                rows[i].pieces.append(text)
                rows[i].forced.append(True)
                rows[i].tokens.append(-1)
                rows[i].times.append(time.perf_counter() - t0)
            active = [rows[i] for i in ctl.pending]
            budgets = [ctl.extra.get(r.index) or max(1, params.max_tokens - r.n_generated) for r in active]
            if not active or ctl.all_stopped:
                break
        for r in rows:
            r.finished = True
        wall = time.perf_counter() - t0
        return SampleResult(rows, 0, ttft or wall, wall, 0)

    def close(self) -> None:
        self.client.close()
