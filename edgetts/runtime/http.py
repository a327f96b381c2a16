"""The FastAPI app of ``edgetts serve``: :func:`create_app` and its routes.

The request logic lives in :mod:`edgetts.runtime.server`, which knows nothing of FastAPI; this
module imports it, never the other way round.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edgetts.engines.spec import serving_threads
from edgetts.pareto.config import point_spec, runnable_strategies
from edgetts.runtime.executor import Executor
from edgetts.runtime.listen import FIRST_BYTE
from edgetts.runtime.policy import Policy
from edgetts.runtime.request_body import APIError
from edgetts.runtime.server import Server, sse

CLOSE = {"Connection": "close"}  # the server closes the connection after this response


class Guard:
    """Pure ASGI middleware in front of every route: the API key, the body limit and read timeout,
    and the arrival time deadlines count from.

    It wraps ``receive`` instead of reading the body itself, so the route still sees the client's
    disconnect (a request-wrapping middleware hides it), and it counts body bytes as they arrive,
    so a chunked body without a length cannot grow past the limit in memory.
    """

    def __init__(self, app, api_key: str | None, max_body: int, reject, read_timeout_s: float = 10.0,
                 done=lambda seconds: None):  # fmt: skip
        self.app, self.api_key, self.max_body, self.reject, self.read_timeout_s = (
            app, api_key, max_body, reject, read_timeout_s)  # fmt: skip
        self.done = done  # seconds from a request's first byte to its response's last

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # The deadline counts from the request's first bytes where the protocol stamped them, else now.
        scope.setdefault("state", {})["arrived"] = scope.get(FIRST_BYTE) or time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        failure = None
        if self.api_key and scope.get("path") != "/healthz":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                failure = APIError(401, "invalid or missing API key", code="invalid_api_key",
                                   kind="authentication_error", headers=CLOSE)  # fmt: skip
        length = headers.get(b"content-length")
        if failure is None and length is not None and (not length.isdigit() or int(length) > self.max_body):
            failure = APIError(413, f"request body larger than {self.max_body} bytes", code="too_large",
                               headers=CLOSE)  # fmt: skip
        # Refused before its body was read: the connection closes after the answer (Connection: close),
        # or a client that goes on sending would hold it open with no timer left to close it.
        if failure is not None:
            return await self.reject(failure)(scope, receive, send)
        arrived = scope["state"]["arrived"]

        async def timed(message):  # the server's clock stops when the response's last byte is handed over
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.done(time.perf_counter() - arrived)
        received, done = 0, False

        async def limited():
            nonlocal received, done
            if done:  # the body is in: later reads wait for a disconnect, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:  # the rest of the body is not read: the connection cannot go on
                raise APIError(408, f"the request body stalled for {self.read_timeout_s:g} s", code="timeout",
                               headers=CLOSE) from None  # fmt: skip
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.max_body:
                    raise APIError(413, f"request body larger than {self.max_body} bytes", code="too_large",
                                   headers=CLOSE)  # fmt: skip
            return message

        return await self.app(scope, limited, timed)


def build_app(server: Server, api_key: str | None, max_body_bytes: int, read_timeout_s: float = 10.0) -> FastAPI:
    app = FastAPI(title="edgetts", version="1", docs_url=None, redoc_url=None)
    app.state.server = server

    def error(e: APIError) -> JSONResponse:
        if e.code != "cancelled":  # counted where the cancel happened
            server.metrics.request("rejected" if e.status == 429 else "error")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error(APIError(e.status_code, str(e.detail), code="http_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return error(APIError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return error(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    app.add_middleware(Guard, api_key=api_key, max_body=max_body_bytes, reject=error, read_timeout_s=read_timeout_s,
                       done=server.metrics.responded)  # fmt: skip

    async def read_json(request: Request):
        try:
            raw = await request.body()  # Guard enforces the size limit and the read timeout while it arrives
        except ClientDisconnect:  # gone in the middle of its body: nobody to answer
            server.metrics.request("cancelled")
            raise APIError(499, "client disconnected", code="cancelled") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError, UnicodeDecodeError):  # bad JSON, 4,300+ digit integers, deep nesting
            raise APIError(400, "the request body is not valid JSON (or nests or numbers too deep)") from None

    async def answer(request: Request, chat: bool):
        arrived = getattr(request.state, "arrived", None)
        out, info = await server.complete(request, await read_json(request), chat, arrived)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": info["generated_tokens"],
                 "total_tokens": out["prompt_tokens"] + info["generated_tokens"]}  # fmt: skip
        if out["stream"]:
            return StreamingResponse(_stream(rid, created, out, info, chat), media_type="text/event-stream")
        if chat:
            message = {"role": "assistant", "content": out["text"]}
            if "reasoning" in out:
                message["reasoning_content"] = out["reasoning"]
            choice = {"index": 0, "message": message, "finish_reason": out["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]}
            if "reasoning" in out:
                choice["reasoning_content"] = out["reasoning"]
            obj = "text_completion"
        # A response object, not a dict: FastAPI would walk a dict through its encoder first, which
        # costs the HTTP thread more than the rest of the response (everything here is plain JSON).
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": out["model"],
                             "choices": [choice], "usage": usage, "edgetts": info})  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    def model_list() -> list[dict]:
        seen = sorted({p["model"] for p in server.policy.frontier})
        return [{"id": m, "object": "model", "created": 0, "owned_by": "edgetts"} for m in ["edgetts", *seen]]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_list()}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):  # OpenAI's retrieve (client.models.retrieve)
        found = next((m for m in model_list() if m["id"] == model), None)
        if found is None:
            raise APIError(404, f"no model {model!r} here; GET /v1/models lists them", "model", code="model_not_found")
        return found

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD: probes that only read the status
    async def healthz():
        body = {"status": "ok", "frontier_points": len(server.policy.frontier), "queue": len(server.pending),
                "slowdown": round(server.slowdown(), 4)}  # fmt: skip
        sick = server.executor.unhealthy()
        if sick:
            return JSONResponse({**body, "status": "unhealthy", "reason": sick}, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics():
        server.metrics.slowdown = round(server.slowdown(), 4)
        server.metrics.price = server.price_now()
        server.metrics.load = server.load_price.load() if server.load_price is not None else None
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _stream(rid: str, created: int, out: dict, info: dict, chat: bool):
    """Server-sent events in OpenAI's chunk format; the answer is known once the votes are in."""
    base = {"id": rid, "created": created, "model": out["model"]}
    end = out["finish_reason"]
    if chat:
        obj = "chat.completion.chunk"
        delta = {"content": out["text"]}
        if "reasoning" in out:
            delta["reasoning_content"] = out["reasoning"]
        yield sse(dict(base, object=obj, choices=[{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]))
        yield sse(dict(base, object=obj, choices=[{"index": 0, "delta": delta, "finish_reason": None}]))
        yield sse(dict(base, object=obj, choices=[{"index": 0, "delta": {}, "finish_reason": end}], edgetts=info))
    else:
        obj = "text_completion"
        choice = {"index": 0, "text": out["text"], "finish_reason": None}
        if "reasoning" in out:
            choice["reasoning_content"] = out["reasoning"]
        yield sse(dict(base, object=obj, choices=[choice]))
        yield sse(dict(base, object=obj, choices=[{"index": 0, "text": "", "finish_reason": end}], edgetts=info))
    yield "data: [DONE]\n\n"


def create_app(config: str, api_key: str | None = None, default_deadline_ms: float = 2000.0, max_queue: int = 32,
               overload: str = "downgrade", max_body_bytes: int = 256 * 1024, threads: int | None = None,
               batching: bool = True, rows: int | None = None, read_timeout_s: float = 10.0,
               gpu_layers: int | None = None, memory_mb: float | None = None, notify=None,
               price: float = 0.0, mean_ms: float | None = None, load_price: bool = False,
               mean_j: float | None = None):  # fmt: skip
    """The app serving ``config``; every engine its frontier names is opened, and each point's strategy
    run once (:meth:`~edgetts.runtime.executor.Executor.warm_up`), before it returns.

    ``batching=False`` runs one request at a time per engine (the sequential server); ``rows``
    is how many rows a batched engine holds at once (default: room for several requests);
    ``read_timeout_s`` is how long a request's body may stall (408); ``threads``, ``gpu_layers`` and
    ``memory_mb`` are the user's settings (:class:`~edgetts.runtime.executor.Executor`), and ``notify``
    gets the one-line notes (settings that differ from the profile's, a failed latency check).
    """
    import sys

    # The engine thread needs the GIL between native calls; under a flood of connections the HTTP
    # thread would otherwise keep it up to 5 ms at a time, and deadlines here are milliseconds.
    sys.setswitchinterval(0.0005)
    policy = Policy.load(config)
    runnable_strategies(policy.config, config)
    from edgetts.pareto.config import one_setting, validation_note

    one_setting(policy.config, config)

    note = validation_note(policy.config, config)
    if note and notify:
        notify(note)
    # One core stays with the HTTP loop: llama.cpp's worker threads spin at every graph barrier,
    # and on a small CPU an extra busy thread makes each decode step several times slower.
    executor = Executor(policy, threads=threads or serving_threads(), gpu_layers=gpu_layers, batching=batching,
                        rows=rows, memory_mb=memory_mb, notify=notify)  # fmt: skip
    say = notify or (lambda line: None)
    say(f"edgetts serve: opening {len(executor.specs())} engine(s) of {config} ({executor.rows} batch rows each)")
    try:
        for point in policy.frontier:
            opened, t0 = len(executor.engines), time.perf_counter()
            executor.engine(point)  # open every engine now: the first request must not pay for it
            if len(executor.engines) > opened:
                say(f"edgetts serve: opened {point_spec(point).label} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        executor.warm_up()
        say(f"edgetts serve: ran each point once in {time.perf_counter() - t0:.1f} s (warm-up)")
    except BaseException:
        executor.close()
        raise
    try:
        server = Server(policy, executor, default_deadline_ms, max_queue, overload, price, mean_ms, load_price, mean_j)
    except BaseException:
        executor.close()
        raise
    return build_app(server, api_key, max_body_bytes, read_timeout_s)
