"""``edgetts serve``: an OpenAI-compatible server that picks strategy and budget per request.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not),
``GET /v1/models`` (and one by id), ``GET``/``HEAD /healthz`` (no key needed), ``GET /metrics``
(Prometheus text).

Per request: the deadline is the body's ``deadline_ms`` extension or the server default,
counted from the request's first bytes (the listening protocol stamps them), held in one
:class:`~edgetts.timing.Deadline` from parsing to the engine's last step: its ``end`` (the
client's deadline less a reserve for the response) is what admission weighs work against,
what the shared batch orders its rounds by and where the strategy stops.  A deadline the
fastest point cannot meet on an idle server is the caller's error (400).  Admission knows the
batch: a point's latency, scaled by the device's measured slowdown, is predicted beside the
requests already admitted on its engine (the shared batch answers: its measured step cost at
the rows ending before it, and the work due by each admitted request's end, which must still
fit; or the queue ahead on a serial engine).  With
``overload="downgrade"`` a request takes the most accurate point that still fits, a cheaper one
before a refusal; with ``"refuse"`` it keeps the point its deadline alone would get, or is
refused.  When nothing fits, the answer is 429 with ``Retry-After``, and the policy counts a run
at the profile (a refusal measures nothing, so an old factor must not refuse forever); when
``max_queue`` requests are in, 429 as well.  Every admitted request runs on its own thread; on a
llama.cpp engine its rows join the one running batch (:mod:`edgetts.engines.batching`), where a
request whose deadline can no longer be met is dropped while still queued (429).  A client that
disconnects cancels its request, queued or running.  On an engine that does not batch, the
latencies of requests that ran alone recalibrate the policy (:meth:`Policy.observe`: the median
against each point's median); a shared batch measures the device's speed every round instead.
Engine failures answer 503 with ``Retry-After``; a request cut before any row answered is never
``deadline_met``.

Points are chosen under the price on compute in force (:mod:`edgetts.runtime.pricing`): 0 by
default (the most accurate point that fits), a fixed ``price``, one that a mean budget per
request holds (:class:`~edgetts.runtime.pricing.MeanSpend`), or with ``load_price`` one on
engine time that follows the load (:class:`~edgetts.runtime.pricing.LoadPrice`, fed the engine
time of every admitted request).

Chat requests render the whole ``messages`` list (system prompt, earlier turns) through the
model's chat template; ``include_reasoning: true`` returns the reasoning of the first row that
gave the winning answer as ``reasoning_content``.  A request whose rows were all stopped before
stating an answer gets an empty answer with ``finish_reason: "length"`` and
``edgetts.error`` saying why.

Experts may force ``strategy``, ``n`` and ``budget`` in the body's ``edgetts`` object;
``max_tokens`` (or ``max_completion_tokens``) caps the thinking budget; ``temperature`` and
``seed`` are honoured; ``stop`` cuts the returned text.  ``n`` > 1 is refused (400): the server
returns one aggregated answer; so are fields asking for what such an answer does not carry
(``logprobs``, ``tools``, a JSON ``response_format``, ``echo``).  Other OpenAI parameters (sampling
filters, penalties, ``user``) are ignored, as OpenAI-compatible servers usually do.  Bodies are checked
in :mod:`edgetts.runtime.request_body`; every error is a JSON body in OpenAI's shape; bad
requests are 4xx, never 5xx.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from edgetts.engines import EngineError
from edgetts.engines.base import EngineFailure
from edgetts.runtime.executor import Executor
from edgetts.runtime.metrics import Metrics
from edgetts.runtime.planning import Late, Plan, Request
from edgetts.runtime.policy import DeadlineTooShort, Policy
from edgetts.runtime.pricing import LoadPrice, MeanSpend
from edgetts.runtime.request_body import APIError, parse
from edgetts.strategies import StrategyError
from edgetts.timing import MARGIN, Deadline


class Server:
    def __init__(self, policy: Policy, executor: Executor, default_deadline_ms: float = 2000.0, max_queue: int = 32,
                 overload: str = "downgrade", price: float = 0.0, mean_ms: float | None = None,
                 load_price: bool = False, mean_j: float | None = None):  # fmt: skip
        if overload not in ("downgrade", "refuse"):
            raise ValueError("overload must be 'downgrade' or 'refuse'")
        self.policy, self.executor = policy, executor
        self.default_deadline_ms, self.max_queue, self.overload = default_deadline_ms, max_queue, overload
        # One thread per admitted request: it runs the strategy and waits on the engine's batch.
        self.workers = ThreadPoolExecutor(max_queue, thread_name_prefix="edgetts-request")
        self.pending: dict[str, Plan] = {}  # admitted and not finished
        self.admitted = 0  # ever: a request admitted last that ends alone in the batch ran alone
        self.lock = threading.Lock()
        self.metrics = Metrics()
        self.price = self.metrics.price = price  # accuracy per millisecond of predicted latency (Policy.select)
        # With a mean budget per request, the price follows the answered requests' latencies, or (on a
        # battery, --mean-j) the energy the device drew per answer.
        mean = mean_j if mean_j is not None else mean_ms
        self.budget = MeanSpend(policy.frontier, mean, mean_j is not None, price) if mean is not None else None
        # A price on engine time that follows the load (LoadPrice).
        self.load_price = LoadPrice() if load_price else None

    def admit(self, rid: str, req: Request) -> Plan:
        """The plan for ``req`` beside the requests already admitted, or 429."""
        now = time.perf_counter()
        deadline = req.deadline
        budget = deadline.run_ms(now)  # the time its strategy will get (reading the request took some)
        try:  # a deadline no point meets on an idle server is the caller's error: 400, never retried
            if not req.expert:  # experts get the point they ask for
                self.policy.check_deadline(req.deadline_ms, require=lambda ms: Deadline.shortest_ms(ms * MARGIN))
        except DeadlineTooShort as e:
            raise APIError(400, str(e), "deadline_ms", code="deadline_too_short") from None
        with self.lock:
            if len(self.pending) >= self.max_queue:
                raise APIError(429, "the queue is full", code="queue_full", kind="rate_limit_error",
                               headers={"Retry-After": "1"})  # fmt: skip
            busy = list(self.pending.values())
            if self.load_price is not None:  # under load, engine time is what is scarce (charge())
                self.price = self.metrics.price = self.load_price.price(self.efficient_price())
            charge = self.charge()

            def cost(point):  # where the point would run: beside the admitted requests, with a margin
                if not req.expert and not self.executor.feasible(point, busy, deadline.end, now):
                    return math.inf  # it would make the batch late: a cheaper point, or 429 (experts run)
                return self.executor.predict_ms(point, busy, deadline.end) * MARGIN

            # "refuse": the point the deadline alone gets, or nothing; "downgrade" (and experts, who get
            # what they ask for and count in the batch by their plan): the most accurate point that
            # fits beside the others, a cheaper one before a refusal.
            refuse = self.overload == "refuse" and not req.expert
            plan = self.executor.plan(req, budget, cost=None if refuse else cost, price=self.price, charge=charge)
            if refuse:
                plan = replace(plan, predicted_ms=cost(plan.point))
            if not req.expert and (plan.choice.miss or plan.predicted_ms > budget):
                self.policy.relax()  # a refusal measures nothing: let an old slowdown fade
                need = plan.predicted_ms  # where it would have run: beside the others
                if math.isfinite(need):
                    retry = max(1, math.ceil((need - budget) / 1000))
                    why = f"the point it would get needs about {need:.0f} ms"
                else:
                    retry, why = 1, "the batch has no room for it before then without making others late"
                raise APIError(429, f"cannot meet deadline_ms={req.deadline_ms:g} beside {len(busy)} admitted "
                               f"request(s): {why}", code="deadline_unmeetable", kind="rate_limit_error",
                               headers={"Retry-After": str(retry)})  # fmt: skip
            plan = replace(plan, deadline=deadline, alone=not busy, order=self.admitted, price=self.price)
            self.admitted += 1
            if self.load_price is not None:
                self.load_price.admitted(self.executor.work_ms(plan.point, plan.solo_ms, plan.n))
            self.pending[rid] = plan
            self.metrics.queue_depth = len(self.pending)
            return plan

    def price_now(self) -> float:
        """The price a request arriving now would be chosen under: the load price as the load is now (it
        falls while the server is idle), else the price in force."""
        return self.load_price.price(self.efficient_price()) if self.load_price is not None else self.price

    def efficient_price(self) -> float:
        """The price at which the point with the most accuracy per engine-ms is chosen (the largest accuracy
        over engine time of the frontier: that point is then worth 0 and every other less)."""
        return max(p["accuracy"] / max(self.executor.work_ms(p), 1e-9) for p in self.policy.frontier)

    def charge(self):
        """What the price multiplies, or None for the predicted latency: energy (J) with ``--mean-j``,
        engine time with ``--load-price``."""
        energy = self.budget.charge() if self.budget is not None else None
        return energy or (self.executor.work_ms if self.load_price is not None else None)

    def slowdown(self) -> float:
        """How much slower the device runs than profiled: what the shared batch measures every round, or the
        policy's recalibration from lone runs on a serial engine."""
        return max(self.policy.slowdown, self.executor.slowdown())

    def release(self, rid: str) -> None:
        with self.lock:
            self.pending.pop(rid, None)
            self.metrics.queue_depth = len(self.pending)

    async def complete(self, request, body: object, chat: bool, arrived: float | None = None) -> tuple[dict, dict]:
        """Answer one request; ``arrived`` is when its first bytes came in (its deadline counts from there)."""
        req, opts = parse(body, chat, self.default_deadline_ms, arrived)
        sick = self.executor.unhealthy()
        if sick:  # nothing would answer it: say so at once rather than after its deadline
            raise APIError(503, f"the server cannot answer: {sick}", code="engine_unavailable", kind="server_error",
                           headers={"Retry-After": "5"})  # fmt: skip
        rid = uuid.uuid4().hex[:24]
        try:
            plan = self.admit(rid, req)
        except StrategyError as e:
            raise APIError(400, str(e), "edgetts") from None
        try:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self.workers, self.executor.run, req, plan)
            # Wait for the answer or the client's disconnect, whichever comes first (polling each
            # request for a disconnect cost the HTTP thread a wake-up per request every 50 ms).
            gone = asyncio.ensure_future(_disconnect(request))
            try:
                await asyncio.wait([fut, gone], return_when=asyncio.FIRST_COMPLETED)
                if not fut.done():
                    req.cancel.set()  # stops it in the engine's queue or at its next decode step
                    await asyncio.wait([fut])
            finally:
                gone.cancel()
            try:
                result = fut.result()
            except Late as e:
                if req.cancel.is_set():
                    self.metrics.request("cancelled", e.waited_ms / 1000)
                    raise APIError(499, "client disconnected", code="cancelled") from None
                raise APIError(429, f"deadline_ms={req.deadline_ms:g} cannot be met: {e}", code="deadline_unmeetable",
                               kind="rate_limit_error", headers={"Retry-After": "1"}) from None  # fmt: skip
            except EngineFailure as e:  # the engine's fault, not the request's: a client may try again
                raise APIError(503, f"the engine failed: {e}", code="engine_unavailable", kind="server_error",
                               headers={"Retry-After": "1"}) from None  # fmt: skip
            except (EngineError, StrategyError) as e:  # the engine refused this request (too long for its context)
                raise APIError(400, str(e)) from None
        finally:
            self.release(rid)
        if req.cancel.is_set():  # its tokens were decoded all the same: they count
            self.metrics.request("cancelled", result.total_ms / 1000, tokens=result.trace.generated_tokens)
            raise APIError(499, "client disconnected", code="cancelled")
        trace = result.trace
        if plan.as_profiled and not self.executor.measures_speed(plan.point):
            if result.engine_ms is not None:  # a serial engine: what its calls took alone, whatever the load
                self.policy.observe(plan.point["id"], result.engine_ms)
            elif plan.alone and self.admitted == plan.order + 1:
                # Otherwise only runs that had the engine to themselves recalibrate: beside others, the
                # occupancy model's error would pass for the device's speed.  A shared batch measures the
                # device's speed every round instead (Scheduler.slowdown), for every request.
                self.policy.observe(plan.point["id"], 1000 * trace.wall_s)
        text = trace.answer or ""
        for s in opts["stop"]:
            text = text.split(s, 1)[0]
        if self.budget is not None:
            self.price = self.metrics.price = self.budget.observe(result.total_ms)
        # An answer cut off before any row stated one is no answer: it never counts as on time.
        met = result.deadline_met and trace.answer is not None
        self.metrics.request("ok", result.total_ms / 1000, plan.point["id"], trace.generated_tokens,
                             missed=not met)  # fmt: skip
        info = {
            "point_id": plan.point["id"], "point_index": plan.choice.index, "engine": plan.point["engine"],
            "strategy": plan.strategy, "n": plan.n, "budget": plan.budget,
            "answer": trace.answer, "votes": trace.votes, "rows_used": trace.rows_used, "early_stop": trace.early_stop,
            "latency_ms": round(result.total_ms, 3), "deadline_ms": req.deadline_ms,
            "deadline_met": met, "generated_tokens": trace.generated_tokens,
            "predicted_ms": round(plan.predicted_ms, 3), "price": plan.price,
        }  # fmt: skip
        if trace.answer is None:  # how its rows ended tells a cut (deadline, length) from a model that said nothing
            info["error"] = _unanswered(trace)
        out = {
            "text": text,
            "model": opts["model"] or plan.point["model"],
            "prompt_tokens": trace.prompt_tokens,
            "stream": opts["stream"],
            "finish_reason": "stop" if trace.answer is not None else "length",
        }
        if req.include_reasoning:
            out["reasoning"] = self._reasoning(trace, plan)
        return out, info

    def _reasoning(self, trace, plan: Plan) -> str:
        """The reasoning of the first row that gave the winning answer (``reasoning_content``)."""
        _, family = self.executor.engine(plan.point)
        row = next((r for r in trace.rows if r.answer == trace.answer and r.answer is not None), None)
        if row is None or not family.think_end:
            return ""
        text = row.text.split(family.think_end, 1)[0]
        return text.split(family.think_start, 1)[-1].strip() if family.think_start else text.strip()


def _unanswered(trace) -> str:
    """Why a request came back with no answer: how its rows ended (a cut, ``deadline`` or ``length``, or a
    model that said nothing), and whether their answers were forced and how far those got."""
    ends = sorted(Counter(r.finish_reason or "unknown" for r in trace.rows).items())
    why = " before the deadline" if trace.early_stop == "deadline" else ""
    forced = [r for r in trace.rows if r.forced_answer]
    how = (f"; answers forced in {len(forced)} of {len(trace.rows)}, {sum(r.answer_tokens for r in forced)} answer "
           f"tokens decoded" if forced else "; no answer forced")  # fmt: skip
    return f"no row stated an answer{why} (rows ended: {', '.join(f'{k} {v}' for k, v in ends)}{how})"


async def _disconnect(request) -> None:
    """Returns when the client has gone: once the body is read, the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
