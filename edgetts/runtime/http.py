"""The FastAPI app of ``edgetts serve``: :func:`create_app` and its routes.

The request logic lives in :mod:`edgetts.runtime.server`, which knows nothing of FastAPI; this
module imports it, never the other way round.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgetts.runtime.executor import Executor
from edgetts.runtime.policy import Policy
from edgetts.runtime.server import APIError, Server, sse


def build_app(server: Server, api_key: str | None, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="edgetts", version="1", docs_url=None, redoc_url=None)
    app.state.server = server

    def error(e: APIError) -> JSONResponse:
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

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/healthz" and api_key:
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error(APIError(401, "invalid or missing API key", code="invalid_api_key",
                                      kind="authentication_error"))  # fmt: skip
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error(APIError(413, f"request body larger than {max_body_bytes} bytes", code="too_large"))
        return await call_next(request)

    async def read_json(request: Request):
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body larger than {max_body_bytes} bytes", code="too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None

    async def answer(request: Request, chat: bool):
        out, info = await server.complete(request, await read_json(request), chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": info["generated_tokens"],
                 "total_tokens": out["prompt_tokens"] + info["generated_tokens"]}  # fmt: skip
        if out["stream"]:
            return StreamingResponse(_stream(rid, created, out, info, chat), media_type="text/event-stream")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": "stop"}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": out["model"], "choices": [choice],
                "usage": usage, "edgetts": info}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.get("/v1/models")
    async def models():
        seen = sorted({p["model"] for p in server.policy.frontier})
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "edgetts"} for m in ["edgetts", *seen]]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "frontier_points": len(server.policy.frontier), "queue": len(server.pending),
                "slowdown": round(server.policy.slowdown, 4)}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _stream(rid: str, created: int, out: dict, info: dict, chat: bool):
    """Server-sent events in OpenAI's chunk format; the answer is known once the votes are in."""
    base = {"id": rid, "created": created, "model": out["model"]}
    if chat:
        obj = "chat.completion.chunk"
        yield sse(dict(base, object=obj, choices=[{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]))
        yield sse(
            dict(base, object=obj, choices=[{"index": 0, "delta": {"content": out["text"]}, "finish_reason": None}])
        )
        yield sse(dict(base, object=obj, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], edgetts=info))
    else:
        obj = "text_completion"
        yield sse(dict(base, object=obj, choices=[{"index": 0, "text": out["text"], "finish_reason": None}]))
        yield sse(dict(base, object=obj, choices=[{"index": 0, "text": "", "finish_reason": "stop"}], edgetts=info))
    yield "data: [DONE]\n\n"


def create_app(config: str, api_key: str | None = None, default_deadline_ms: float = 2000.0, max_queue: int = 32,
               overload: str = "downgrade", max_body_bytes: int = 256 * 1024, threads: int | None = None):  # fmt: skip
    """The app serving ``config``; every engine its frontier names is opened before it returns."""
    import os
    import sys

    # The engine thread needs the GIL between native calls; under a flood of connections the HTTP
    # thread would otherwise keep it up to 5 ms at a time, and deadlines here are milliseconds.
    sys.setswitchinterval(0.0005)
    policy = Policy.load(config)
    # One core stays with the HTTP loop: llama.cpp's worker threads spin at every graph barrier,
    # and on a small CPU an extra busy thread makes each decode step several times slower.
    executor = Executor(policy, threads=threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        for point in policy.frontier:
            executor.engine(point)  # open every engine now: the first request must not pay for it
    except BaseException:
        executor.close()
        raise
    server = Server(policy, executor, default_deadline_ms, max_queue, overload)
    return build_app(server, api_key, max_body_bytes)
