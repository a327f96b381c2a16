"""An engine over any OpenAI-compatible completions server (llama-server, vLLM, TensorRT-LLM, Ollama).

Use it when the model outgrows the device and already runs behind a serving engine, or to
profile that serving engine itself.  The server cannot be stepped, so the engine works in
*rounds*:

* parallel samples: one request per row, sent concurrently with per-row seeds (servers with
  several slots decode them together), or ``parallel="n"``: one request with ``n`` choices for
  the first round (cheaper where supported, but seeds are then per request, not per row);
* before each round the controller says how far each row may go before it must look again
  (``controller.horizon(row)``): a thinking row runs to its thinking budget, an answering row
  to the end of its answer room;
* after each round the controller runs once over all rows, as a steppable engine's controller
  runs after each token: it may stop rows or force text into them.  A row it forced text into,
  or one cut at its horizon, is continued by another request whose prompt is the original
  prompt, the row's text so far and the forced text.  Rounds repeat while rows are open (at
  most ``max_rounds``).

What it cannot do, and declares: no log-probabilities, no probes (pooled profiling), no
mid-request control (a deadline is checked between rounds; "Wait" replacement is impossible).
Token counts come from the server's ``usage`` (exact per row in the per-request mode); a
round's text is one piece, so a row's ``tokens`` are placeholders (-1), one per server token,
plus one per forced text.  ``ttft`` is the time to the first round's answers.  ``httpx`` is
imported when the engine is constructed.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from edgetts.engines.base import (
    Control,
    Controller,
    Engine,
    EngineError,
    EngineFailure,
    Row,
    SampleResult,
    SamplingParams,
    draw_seed,
)


class OpenAIHTTPEngine(Engine):
    name = "openai-http"
    parallel_rows = True
    forced_tokens = True  # between requests, not mid-request
    logprobs = False
    steppable = False
    needs_url = True
    # Calls keep their state to themselves and httpx's client pools connections for concurrent use:
    # a server in front of vLLM or llama-server sends its requests' calls at once (up to
    # ``concurrency``), so the upstream batches them, instead of one call at a time.
    thread_safe = True
    options: ClassVar[dict[str, type]] = {"parallel": str, "api_key_env": str, "timeout": float, "max_rounds": int,
                                          "concurrency": int}  # fmt: skip

    @classmethod
    def open(cls, spec, plan) -> OpenAIHTTPEngine:
        o = spec.options
        key = os.environ.get(o.get("api_key_env") or "EDGETTS_UPSTREAM_API_KEY")  # secrets stay out of configs
        return cls(spec.url, model=spec.artifact or "", api_key=key, parallel=o.get("parallel") or "requests",
                   timeout=float(o.get("timeout") or 600.0), max_rounds=o.get("max_rounds") or 8,
                   concurrency=o.get("concurrency") or 16)  # fmt: skip

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key: str | None = None,
        parallel: str = "requests",
        timeout: float = 600.0,
        max_rounds: int = 8,
        concurrency: int = 16,
    ):
        import httpx

        if parallel not in ("requests", "n"):
            raise EngineError(f"parallel must be 'requests' or 'n', got {parallel!r}")
        if not base_url.startswith(("http://", "https://")):
            raise EngineError(f"server URL must start with http:// or https://, got {base_url!r}")
        if max_rounds < 1:
            raise EngineError(f"max_rounds must be at least 1, got {max_rounds}")
        if concurrency < 1:
            raise EngineError(f"concurrency must be at least 1, got {concurrency}")
        self.calls = threading.BoundedSemaphore(concurrency)  # sample() calls in flight at once
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max(100, 8 * concurrency), max_keepalive_connections=4 * concurrency)
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, limits=limits)
        self.timeout = timeout
        self.model = model
        self.parallel = parallel
        self.max_rounds = max_rounds
        self._httpx = httpx

    def _post(self, body: dict, timeout: float | None = None) -> dict:
        """One completions call; ``timeout``: the seconds its deadline leaves it (None: the engine's own)."""
        # The upstream unreachable, failing (5xx), busy (429) or answering garbage is the server's fault, which
        # a client may retry (EngineFailure: 503 in serve); a 4xx is this request's (a prompt too long there).
        try:
            r = self.client.post("/completions", json=body,
                                 timeout=self._httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)  # fmt: skip
        except self._httpx.TimeoutException as e:
            if timeout is not None and timeout < self.timeout:
                raise _PastDeadline from None  # the call outlived its request's deadline: its rows are cut
            raise EngineFailure(f"{self.base_url}: request failed ({type(e).__name__}: {e})") from None
        except self._httpx.HTTPError as e:
            raise EngineFailure(f"{self.base_url}: request failed ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            kind = EngineFailure if r.status_code >= 500 or r.status_code == 429 else EngineError
            raise kind(f"{self.base_url}/completions answered {r.status_code}: {r.text[:200]}")
        try:
            out = r.json()
        except (ValueError, RecursionError):
            out = None
        why = _unlike_completions(out, body["max_tokens"] * body["n"])
        if why:  # what a row would be extended by: checked before any of it is used
            raise EngineFailure(f"{self.base_url}/completions: not an OpenAI completions response ({why})")
        return out

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
            body["seed"] = draw_seed(seed)  # -1 and 2**32 - 1 ask llama-server for a random seed
        # Extensions llama-server, vLLM and llama-cpp-python's server read; sent even when off,
        # because their own defaults (top-k 40, min-p 0.05) would otherwise change the sampling.
        body["top_k"] = params.top_k
        body["min_p"] = params.min_p
        return body

    def tokenize(self, text: str) -> list[int]:
        raise EngineError("the OpenAI HTTP engine cannot tokenize locally; budgets are in server tokens")

    def count_tokens(self, text: str) -> int:
        """A rough count (4 characters a token) for local bookkeeping only."""
        return max(1, len(text) // 4)

    def _round(self, prompt: str, rows: list[Row], params: SamplingParams, budgets: list[int], t0: float,
               timeout: float | None = None) -> None:  # fmt: skip
        """One request per row (or one with n choices) continuing each row's text."""
        if self.parallel == "n" and all(not r.text for r in rows) and len(set(budgets)) == 1:
            out = self._post(self._body(prompt, params, budgets[0], params.seed, n=len(rows)), timeout)
            per_row = ((out.get("usage") or {}).get("completion_tokens") or 0) // max(1, len(rows))
            for r, ch in zip(rows, sorted(out["choices"], key=lambda c: c.get("index", 0))):
                self._extend(r, ch, per_row, t0)
            return

        def one(k):
            r = rows[k]
            return self._post(self._body(prompt + r.text, params, budgets[k], r.seed), timeout)

        with ThreadPoolExecutor(max(1, len(rows))) as pool:
            outs = list(pool.map(one, range(len(rows))))
        for r, out in zip(rows, outs):
            self._extend(r, out["choices"][0], (out.get("usage") or {}).get("completion_tokens") or 0, t0)

    @staticmethod
    def _extend(r: Row, choice: dict, n_tokens: int, t0: float) -> None:
        now = time.perf_counter() - t0
        text = choice.get("text") or ""
        r.pieces.append(text)
        r.tokens.extend([-1] * n_tokens)
        r.forced.extend([False] * n_tokens)
        r.times.extend([now] * n_tokens)
        r.n_generated += n_tokens
        # A row that returned nothing cannot go on (the server's context is full, say).
        r.finish_reason = "stop" if choice.get("finish_reason") == "stop" or not n_tokens else "length"

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
        if seeds is not None and len(seeds) != n:
            raise EngineError(f"got {len(seeds)} seeds for {n} rows")
        with self.calls:
            return self._sample(prompt, n, params, controller, seeds)

    def _sample(self, prompt, n, params, controller, seeds) -> SampleResult:
        t0 = time.perf_counter()
        seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
        rows = [Row(i, seeds[i]) for i in range(n)]
        limit = [params.max_tokens] * n  # sampled tokens per row; forcing may grant more
        horizon = getattr(controller, "horizon", None)
        active, ttft, rounds = list(rows), None, 0
        while active and rounds < self.max_rounds:
            budgets = [max(1, min(limit[r.index] - r.n_generated, horizon(r) if horizon else limit[r.index]))
                       for r in active]  # fmt: skip
            try:
                self._round(prompt, active, params, budgets, t0, _call_timeout(controller, self.timeout))
            except _PastDeadline:  # an upstream slower than the deadline: the rows end there, not minutes later
                for r in active:
                    r.finished, r.finish_reason = True, "deadline"
                break
            rounds += 1
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            for r in active:  # a row cut at its horizon stays open so the controller may continue or force it
                r.finished = r.finish_reason == "stop"
            if controller is not None:
                ctl = Control(rows, t0)
                controller(ctl, [r.index for r in active])
                now = time.perf_counter() - t0
                for i, text in ctl.pending.items():
                    r = rows[i]
                    r.pieces.append(text)
                    r.forced.append(True)
                    r.tokens.append(-1)
                    r.times.append(now)
                    limit[i] += ctl.extra.get(i, 0)
                if ctl.all_stopped:
                    break
            for r in rows:
                if not r.finished and r.n_generated >= limit[r.index]:
                    r.finished, r.finish_reason = True, "length"
            active = [r for r in rows if not r.finished]
        for r in rows:
            if not r.finished:
                r.finished, r.finish_reason = True, r.finish_reason or "length"
        wall = time.perf_counter() - t0
        return SampleResult(rows, self.count_tokens(prompt), ttft if ttft is not None else wall, wall, rounds)

    def close(self) -> None:
        self.client.close()


class _PastDeadline(Exception):
    """A call timed out at its request's deadline (not at the engine's own timeout)."""


PAST_DEADLINE = 0.1  # a call may run this share of its request's deadline past it (at least 50 ms)


def _call_timeout(controller, default: float) -> float | None:
    """The seconds a call may take: what the controller's deadline leaves, plus a little; None without one."""
    deadline, started = getattr(controller, "deadline_s", None), getattr(controller, "started", None)
    if deadline is None or started is None:
        return None
    left = deadline - (time.perf_counter() - started) + max(0.05, PAST_DEADLINE * deadline)
    return min(default, max(0.01, left))


def _unlike_completions(out, most_tokens: int) -> str | None:
    """Why ``out`` is not a completions response edgetts can use (None: it is): choices with text, and a
    token count that is a whole number no larger than what was asked (a count from a broken server
    sized lists by it)."""
    if not isinstance(out, dict) or not isinstance(out.get("choices"), list) or not out["choices"]:
        return "no choices"
    for ch in out["choices"]:
        if not (isinstance(ch, dict) and isinstance(ch.get("text") or "", str) and isinstance(ch.get("index", 0), int)):
            return "a choice without text"
    usage = out.get("usage") or {}
    used = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(usage, dict) or not (used is None or (isinstance(used, int) and 0 <= used <= most_tokens)):
        return f"completion_tokens {str(used)[:20]} for at most {most_tokens} asked"
    return None
