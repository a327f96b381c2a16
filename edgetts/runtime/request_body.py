"""The body of an OpenAI-compatible request, checked: what ``edgetts serve`` answers, or why not.

:func:`parse` turns a chat or completion body into a :class:`~edgetts.runtime.planning.Request`
and the reply's options, or raises :class:`APIError` (a status and OpenAI's error shape) naming
the field at fault: a bad request is a 4xx, never a 5xx.  Text fields must be valid Unicode (JSON
allows lone surrogates, which no tokenizer can encode and no response can echo); numbers must be
finite and in range; chat roles are OpenAI's; content parts other than text (an image) are refused;
fields that ask for an output no aggregated text answer gives (``logprobs``, ``tools``, JSON
``response_format``, ``echo``...) are refused, not ignored; ``max_completion_tokens`` is
``max_tokens``; the body's ``edgetts`` object (``strategy``, ``n``, ``budget``) takes no other
field, so a misspelt one is not silently ignored.
"""

from __future__ import annotations

import math
import time

from edgetts.runtime.planning import Request
from edgetts.strategies import STRATEGIES


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers or {})  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# OpenAI fields that ask for an output this server does not give (token log-probabilities, tool calls, JSON
# mode, the prompt echoed, several completions to pick from, banned tokens): refused when they ask for it, since a
# client relying on them would misread the answer; values that ask for nothing (false, 0, 1, [], "text") pass.
UNSUPPORTED = {
    "logprobs": lambda v: bool(v), "top_logprobs": lambda v: bool(v), "echo": lambda v: bool(v),
    "suffix": lambda v: bool(v), "best_of": lambda v: v not in (None, 1), "logit_bias": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "response_format": lambda v: not (isinstance(v, dict) and v.get("type") in (None, "text")) if v else False,
}
ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's (function: the older tool)
EXTENSION_FIELDS = {"strategy", "n", "budget"}  # the request's "edgetts" object


def _number(body, name, lo=None, hi=None, integer=False, required=False, within=""):
    """``body[name]`` checked; ``within`` names the object it is in for the error (``edgetts.``)."""
    v = body.get(name)
    name = within + name
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


def parse(body: object, chat: bool, default_deadline_ms: float, arrived: float | None = None) -> tuple[Request, dict]:
    """The request in ``body`` (its deadline counting from ``arrived``, default now) and the reply's options."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = None
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or len(msgs) > 256:
            raise APIError(400, "'messages' must be a non-empty list of at most 256 messages", "messages")
        turns = []
        for i, m in enumerate(msgs):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: their text, in order; an image is not read, so refused
                parts = [c.get("text") if isinstance(c, dict) and c.get("type") == "text" else None for c in content]
                content = "".join(parts) if parts and all(isinstance(p, str) for p in parts) else None
            if not isinstance(content, str) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] needs a string 'role' and a string (or text-part) 'content'",
                               "messages")  # fmt: skip
            if m["role"] not in ROLES:
                raise APIError(400, f"messages[{i}].role must be one of: {', '.join(ROLES)}", "messages")
            turns.append({"role": _text(m["role"], "messages"), "content": _text(content, "messages")})
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last_user is None:
            raise APIError(400, "'messages' holds no user message", "messages")
        messages = tuple(turns[: last_user + 1])  # the conversation up to the question
        if sum(len(t["content"]) for t in messages) > 64_000:
            raise APIError(400, "the conversation is longer than 64,000 characters", "messages")
        question = turns[last_user]["content"]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or a list of one string)", "prompt")
        question = _text(prompt, "prompt")
    if not question.strip():
        raise APIError(400, "the question is empty", "messages" if chat else "prompt")
    if len(question) > 32_000:
        raise APIError(400, "the question is longer than 32,000 characters", "messages" if chat else "prompt")
    n = _number(body, "n", 1, 128, integer=True)
    if n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: edgetts returns one aggregated answer (set edgetts.n for "
                       "the number of parallel samples)", "n")  # fmt: skip
    _supported(body)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):  # fmt: skip
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    for s in stop or []:
        _text(s, "stop")
    for flag in ("stream", "include_reasoning"):
        if flag in body and not isinstance(body[flag], bool):
            raise APIError(400, f"'{flag}' must be a boolean", flag)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > 256):
        raise APIError(400, "'model' must be a string of at most 256 characters", "model")
    if model is not None:
        _text(model, "model")  # it is echoed in the response, which a lone surrogate cannot be written into
    ext = {} if body.get("edgetts") is None else body["edgetts"]
    if not isinstance(ext, dict):
        raise APIError(400, "'edgetts' must be an object", "edgetts")
    unknown = sorted(set(ext) - EXTENSION_FIELDS)
    if unknown:  # a misspelt field would otherwise be ignored and the request answered as if it were absent
        raise APIError(400, f"edgetts.{unknown[0]} is not a field: edgetts takes {', '.join(sorted(EXTENSION_FIELDS))}",
                       "edgetts")  # fmt: skip
    strategy = ext.get("strategy")
    if strategy is not None and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise APIError(400, f"edgetts.strategy must be one of: {', '.join(STRATEGIES)}", "edgetts.strategy")
    req = Request(
        question=question,
        deadline_ms=_number(body, "deadline_ms", 1, 3_600_000) or default_deadline_ms,
        temperature=_number(body, "temperature", 0, 2) if body.get("temperature") is not None else 1.0,
        seed=_number(body, "seed", 0, 2**31 - 1, integer=True) or 0,
        max_tokens=_max_tokens(body),
        strategy=strategy,
        n=_number(ext, "n", 1, 64, integer=True, within="edgetts."),
        budget=_number(ext, "budget", 1, 1_000_000, integer=True, within="edgetts."),
        messages=messages,
        include_reasoning=bool(body.get("include_reasoning")),
        arrived=time.perf_counter() if arrived is None else arrived,
    )
    return req, {"stream": bool(body.get("stream")), "stop": stop or [], "model": model}


def _supported(body: dict) -> None:
    """A 400 naming the first field of ``body`` that asks for what this server does not do (:data:`UNSUPPORTED`)."""
    for name, asks in UNSUPPORTED.items():
        if asks(body.get(name)):
            raise APIError(400, f"'{name}' is not supported: edgetts serve returns one aggregated text answer "
                           "(send it without this field)", name)  # fmt: skip
    if body.get("tools") and body.get("tool_choice", "auto") != "none":
        raise APIError(400, "'tools' is not supported: edgetts serve returns text, never a tool call (send it "
                       "without tools, or with tool_choice 'none')", "tools")  # fmt: skip


def _max_tokens(body: dict) -> int | None:
    """``max_tokens``, or ``max_completion_tokens`` (the newer name in OpenAI's chat API); both must agree."""
    old, new = (_number(body, k, 1, 1_000_000, integer=True) for k in ("max_tokens", "max_completion_tokens"))
    if old is not None and new is not None and old != new:
        raise APIError(400, f"'max_tokens' ({old}) and 'max_completion_tokens' ({new}) differ: give one",
                       "max_completion_tokens")  # fmt: skip
    return new if new is not None else old


def _text(s: str, param: str) -> str:
    """``s`` if it is valid Unicode text (JSON allows lone surrogates, which no tokenizer can encode)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' holds invalid Unicode (a lone surrogate)", param) from None
    return s
