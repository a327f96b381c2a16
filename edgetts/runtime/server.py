"""``edgetts serve``: an OpenAI-compatible server that picks strategy and budget per request.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not),
``GET /v1/models``, ``GET /healthz`` (no key needed), ``GET /metrics`` (Prometheus text).

Per request: the deadline is the body's ``deadline_ms`` extension or the server default; the
policy picks the most accurate frontier point that fits it *after the queue ahead of it*
(admission): the wait is estimated as the predicted latency of every request admitted and
not yet finished.  With ``overload="downgrade"`` a request takes the cheaper point that still
fits; with ``"refuse"`` it keeps the point its deadline alone would get, or is refused.  When
nothing fits, or the queue is full, the answer is 429 with ``Retry-After``.  One worker thread
runs requests in order (one engine batch at a time, as the device would); a client that
disconnects cancels its request, queued or running.  Observed latencies recalibrate the policy.

Experts may force ``strategy``, ``n`` and ``budget`` in the body's ``edgetts`` object;
``max_tokens`` caps the thinking budget; ``temperature`` and ``seed`` are honoured; ``stop``
cuts the returned text.  ``n`` > 1 is refused (400): the server returns one aggregated answer.
Other OpenAI parameters are ignored, as OpenAI-compatible servers usually do.  Every error is
a JSON body in OpenAI's shape; bad requests are 4xx, never 5xx.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from edgetts.engines import EngineError
from edgetts.runtime.executor import Executor
from edgetts.runtime.metrics import Metrics
from edgetts.runtime.planning import MARGIN, MAX_RATIO, OVERHEAD_MS, Late, Plan, Request
from edgetts.runtime.policy import Policy
from edgetts.strategies import STRATEGIES, StrategyError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers or {})  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body, name, lo=None, hi=None, integer=False, required=False):
    v = body.get(name)
    if v is None:
        if required:
            raise APIError(400, f"'{name}' is required", name)
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}", name)
    return v


def parse(body: object, chat: bool, default_deadline_ms: float) -> tuple[Request, dict]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] needs a string 'role' and a string 'content'", "messages")
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            raise APIError(400, "'messages' holds no user message", "messages")
        question = users[-1]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or a list of one string)", "prompt")
        question = prompt
    if not question.strip():
        raise APIError(400, "the question is empty", "messages" if chat else "prompt")
    if len(question) > 32_000:
        raise APIError(400, "the question is longer than 32,000 characters", "messages" if chat else "prompt")
    n = _number(body, "n", 1, 128, integer=True)
    if n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: edgetts returns one aggregated answer (set edgetts.n for "
                       "the number of parallel samples)", "n")  # fmt: skip
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):  # fmt: skip
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    ext = body.get("edgetts") or {}
    if not isinstance(ext, dict):
        raise APIError(400, "'edgetts' must be an object", "edgetts")
    strategy = ext.get("strategy")
    if strategy is not None and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise APIError(400, f"edgetts.strategy must be one of: {', '.join(STRATEGIES)}", "edgetts.strategy")
    req = Request(
        question=question,
        deadline_ms=_number(body, "deadline_ms", 1, 3_600_000) or default_deadline_ms,
        temperature=_number(body, "temperature", 0, 2) if body.get("temperature") is not None else 1.0,
        seed=_number(body, "seed", 0, 2**31 - 1, integer=True) or 0,
        max_tokens=_number(body, "max_tokens", 1, 1_000_000, integer=True),
        strategy=strategy,
        n=_number(ext, "n", 1, 64, integer=True),
        budget=_number(ext, "budget", 1, 1_000_000, integer=True),
    )
    return req, {"stream": bool(body.get("stream")), "stop": stop or [], "model": body.get("model")}


class Server:
    def __init__(self, policy: Policy, executor: Executor, default_deadline_ms: float = 2000.0, max_queue: int = 32,
                 overload: str = "downgrade"):  # fmt: skip
        if overload not in ("downgrade", "refuse"):
            raise ValueError("overload must be 'downgrade' or 'refuse'")
        self.policy, self.executor = policy, executor
        self.default_deadline_ms, self.max_queue, self.overload = default_deadline_ms, max_queue, overload
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="edgetts-engine")
        self.pending: dict[str, float] = {}  # request id -> predicted ms, admitted and not finished
        self.lock = threading.Lock()
        self.metrics = Metrics()
        self.service_ratio = MARGIN  # observed worker time over predicted time, moving average

    def admit(self, rid: str, req: Request) -> Plan:
        with self.lock:
            if len(self.pending) >= self.max_queue:
                raise APIError(429, "the queue is full", code="queue_full", kind="rate_limit_error",
                               headers={"Retry-After": "1"})  # fmt: skip
            # Predictions are profiled engine times; requests also pay HTTP and thread hand-offs.
            factor = max(MARGIN, self.service_ratio)
            wait = sum(self.pending.values()) * factor + OVERHEAD_MS * len(self.pending)
            budget_ms = req.deadline_ms if self.overload == "refuse" or req.expert else req.deadline_ms - wait
            plan = self.executor.plan(req, max(budget_ms, 0.0))
            # The request's own time: the policy's prediction (already recalibrated) with the fixed margin;
            # the queue's: scaled by what the worker really took (one slow request must not refuse all).
            predicted = plan.choice.predicted_ms * MARGIN + OVERHEAD_MS
            if not req.expert and (plan.choice.miss or wait + predicted > req.deadline_ms):
                retry = max(1, math.ceil((wait + predicted - req.deadline_ms) / 1000))
                raise APIError(429, f"cannot meet deadline_ms={req.deadline_ms:g} behind {len(self.pending)} queued "
                               f"request(s) (about {wait:.0f} ms)", code="deadline_unmeetable", kind="rate_limit_error",
                               headers={"Retry-After": str(retry)})  # fmt: skip
            self.pending[rid] = plan.choice.predicted_ms
            self.metrics.queue_depth = len(self.pending)
            return plan

    def release(self, rid: str) -> None:
        with self.lock:
            self.pending.pop(rid, None)
            self.metrics.queue_depth = len(self.pending)

    async def complete(self, request, body: object, chat: bool) -> tuple[dict, dict]:
        started = time.perf_counter()
        req, opts = parse(body, chat, self.default_deadline_ms)
        rid = uuid.uuid4().hex[:24]
        try:
            plan = self.admit(rid, req)
        except StrategyError as e:
            raise APIError(400, str(e), "edgetts") from None
        try:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self.worker, self.executor.run, req, plan, started,
                                       max(1.0, min(self.service_ratio, 2.0)))  # fmt: skip
            while not fut.done():
                if await request.is_disconnected():
                    req.cancel.set()  # stops it in the queue or at its next decode step
                await asyncio.wait([fut], timeout=0.05)
            try:
                result = fut.result()
            except Late as e:
                raise APIError(
                    429,
                    f"deadline_ms={req.deadline_ms:g} cannot be met: {e}",
                    code="deadline_unmeetable",
                    kind="rate_limit_error",
                    headers={"Retry-After": "1"},
                ) from None
            except EngineError as e:  # the engine refused this request (too long for its context, say)
                raise APIError(400, str(e)) from None
        finally:
            self.release(rid)
        if req.cancel.is_set():
            self.metrics.request("cancelled", result.total_ms / 1000)
            raise APIError(499, "client disconnected", code="cancelled")
        trace, plan = result.trace, result.plan
        if not req.expert:  # expert overrides run other work than the point
            with self.lock:  # how much longer than predicted the worker really takes per request
                ratio = result.service_ms / max(self.policy.predicted_ms(plan.point), 0.1)
                self.service_ratio = 0.5 * self.service_ratio + 0.5 * min(ratio, MAX_RATIO)
        text = trace.answer or ""
        for s in opts["stop"]:
            text = text.split(s, 1)[0]
        self.metrics.request("ok", result.total_ms / 1000, plan.point["id"], trace.generated_tokens,
                             missed=not result.deadline_met)  # fmt: skip
        info = {
            "point_id": plan.point["id"], "point_index": plan.choice.index, "engine": plan.point["engine"],
            "strategy": plan.strategy, "n": plan.n, "budget": plan.budget,
            "answer": trace.answer, "votes": trace.votes, "rows_used": trace.rows_used, "early_stop": trace.early_stop,
            "latency_ms": round(result.total_ms, 3), "deadline_ms": req.deadline_ms,
            "deadline_met": result.deadline_met, "generated_tokens": trace.generated_tokens,
        }  # fmt: skip
        return {
            "text": text,
            "edgetts": info,
            "model": opts["model"] or plan.point["model"],
            "prompt_tokens": trace.prompt_tokens,
            "stream": opts["stream"],
        }, info


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
