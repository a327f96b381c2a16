"""Prometheus text-format metrics for the server (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.points: Counter = Counter()
        self.buckets = [0] * len(BUCKETS)
        self.count = 0
        self.total = 0.0
        self.misses = 0
        self.tokens = 0
        self.queue_depth = 0
        self.responses, self.response_total, self.response_buckets = 0, 0.0, [0] * len(BUCKETS)
        self.price = 0.0  # the price on compute in force
        self.slowdown = 1.0  # the device's speed against the profile's (set when rendered)
        self.load: float | None = None  # the share of the engine's time asked for lately (a load price's)

    def request(self, outcome: str, seconds: float = 0.0, point: str | None = None, tokens: int = 0,
                missed: bool = False) -> None:  # fmt: skip
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome in ("ok", "cancelled"):
                self.count += 1
                self.total += seconds
                for i, b in enumerate(BUCKETS):
                    if seconds <= b:
                        self.buckets[i] += 1
            if point:
                self.points[point] += 1
            self.tokens += tokens
            self.misses += missed

    def responded(self, seconds: float) -> None:
        """A response's last byte went out ``seconds`` after its request's first byte came in."""
        with self.lock:
            self.responses += 1
            self.response_total += seconds
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    self.response_buckets[i] += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP edgetts_requests_total Requests by outcome.", "# TYPE edgetts_requests_total counter"]
            lines += [f'edgetts_requests_total{{outcome="{_label(o)}"}} {c}' for o, c in sorted(self.outcomes.items())]
            lines += ["# HELP edgetts_request_seconds End-to-end latency of answered requests.",
                      "# TYPE edgetts_request_seconds histogram"]  # fmt: skip
            lines += [f'edgetts_request_seconds_bucket{{le="{b}"}} {c}' for b, c in zip(BUCKETS, self.buckets)]
            lines += [f'edgetts_request_seconds_bucket{{le="+Inf"}} {self.count}',
                      f"edgetts_request_seconds_sum {self.total}", f"edgetts_request_seconds_count {self.count}",
                      "# HELP edgetts_deadline_misses_total Answers later than their deadline.",
                      "# TYPE edgetts_deadline_misses_total counter", f"edgetts_deadline_misses_total {self.misses}",
                      "# HELP edgetts_point_chosen_total Requests per frontier point.",
                      "# TYPE edgetts_point_chosen_total counter"]  # fmt: skip
            lines += [f'edgetts_point_chosen_total{{point="{_label(p)}"}} {c}' for p, c in sorted(self.points.items())]
            lines += ["# HELP edgetts_queue_depth Requests admitted and not finished.",
                      "# TYPE edgetts_queue_depth gauge", f"edgetts_queue_depth {self.queue_depth}",
                      "# HELP edgetts_tokens_generated_total Tokens generated over all rows.",
                      "# TYPE edgetts_tokens_generated_total counter",
                      f"edgetts_tokens_generated_total {self.tokens}",
                      "# HELP edgetts_price Price on compute in force (accuracy per ms of predicted latency).",
                      "# TYPE edgetts_price gauge", f"edgetts_price {self.price}",
                      "# HELP edgetts_slowdown How much slower the device runs than it was profiled (1: as fast).",
                      "# TYPE edgetts_slowdown gauge", f"edgetts_slowdown {self.slowdown}",
                      "# HELP edgetts_response_seconds From a request's first byte in to its response's last "
                      "byte out (every response).", "# TYPE edgetts_response_seconds histogram"]  # fmt: skip
            lines += [f'edgetts_response_seconds_bucket{{le="{b}"}} {c}'
                      for b, c in zip(BUCKETS, self.response_buckets)]  # fmt: skip
            lines += [f'edgetts_response_seconds_bucket{{le="+Inf"}} {self.responses}',
                      f"edgetts_response_seconds_sum {self.response_total}",
                      f"edgetts_response_seconds_count {self.responses}"]  # fmt: skip
            if self.load is not None:
                lines += ["# HELP edgetts_engine_load Share of the engine's time the requests admitted lately "
                          "asked for (1: all of it), which the load price follows.",
                          "# TYPE edgetts_engine_load gauge", f"edgetts_engine_load {self.load}"]  # fmt: skip
            return "\n".join(lines) + "\n"


def _label(value: object) -> str:
    """A label value in Prometheus' text format: a point id comes from a model's file name or a config,
    and a quote or a newline in it would end the label (or the line) early."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
