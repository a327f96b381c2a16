"""The one engine primitive: N continuations of one prompt, decoded together, with per-row control.

An engine implements :meth:`Engine.sample`.  It tokenizes the prompt, evaluates it once,
shares that state with ``n`` rows and then decodes all live rows step by step.  After each
step it calls the controller (a strategy) with a :class:`Control` handle, through which the
controller may

* ``stop(row)`` a row (its tokens so far are kept),
* ``stop_all()``,
* ``force(row, text)``: append ``text`` to a row as if the model had written it (for example
  the end-of-thinking delimiter and an answer prefix); decoding continues after it.

Engines declare what they can do as class attributes (``parallel_rows``, ``forced_tokens``,
``logprobs``, ``steppable``, ``probes``); strategies read those, never engine names.  Engines
register by name in :data:`REGISTRY` (see :mod:`edgetts.engines`) and are opened from an
engine spec by :func:`edgetts.engines.open_engine` through their :meth:`Engine.open`.

An engine that cannot step (an HTTP server) calls the controller after each *round* of
requests instead of each token.  Before a round it asks the controller how far each row may
go before the controller must look again (``controller.horizon(row)``, when the controller
has it), so a thinking budget still cuts a row where it should.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar


class EngineError(ValueError):
    """A user-facing engine problem (bad model file, context too small, bad option)."""


class EngineFailure(EngineError):
    """The engine could not do work it should have done (a failed decode, a closed engine, a batch
    thread that is gone): the server's fault, not the request's; a server answers 503 and a client
    may retry."""


@dataclass(frozen=True)
class SamplingParams:
    """How each row samples; the defaults are plain sampling at temperature 1.

    ``temperature == 0`` means greedy decoding.  ``top_k == 0``, ``top_p == 1`` and
    ``min_p == 0`` disable those filters.  Row ``i`` uses seed ``seed + i`` unless
    explicit per-row seeds are passed to :meth:`Engine.sample`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    max_tokens: int = 256
    logprobs: int | None = None  # None: none; 0: sampled token only; k: also the top k
    ignore_eos: bool = False  # never end a row on end-of-generation (benchmarks of fixed length)

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:  # inf: every token alike, no sampling
            raise EngineError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise EngineError("top_k must be >= 0, top_p in (0, 1], min_p in [0, 1)")
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {self.max_tokens}")


# llama.cpp (and llama-server) read this seed as "draw a random one": a row seeded with it would not repeat.
RANDOM_SEED = 0xFFFFFFFF


def draw_seed(seed: int) -> int:
    """The 32-bit seed a row's sampler draws with: ``seed`` modulo 2**32, except the one value llama.cpp
    reads as "random" (``RANDOM_SEED``, which ``seed = -1`` or ``seed + i`` past 2**32 - 2 reach), which
    becomes 0: a row's tokens always follow from its seed.  The C runtime maps seeds the same way."""
    s = seed & 0xFFFFFFFF
    return 0 if s == RANDOM_SEED else s


@dataclass
class Row:
    """One continuation.  ``tokens`` holds generated and forced tokens in order."""

    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds since the call started
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end of sequence), "length", "stopped" (by controller), "deadline"
    probes: dict = field(default_factory=dict)  # label -> (text, sampled tokens) of side branches
    n_generated: int = 0  # tokens the model sampled (forced tokens excluded), kept by add/pop_last

    def add(self, token: int, piece: str, forced: bool, t: float) -> None:
        """Append one token; engines call this so counts stay O(1) in the decode loop."""
        self.tokens.append(token)
        self.pieces.append(piece)
        self.forced.append(forced)
        self.times.append(t)
        self.n_generated += not forced

    def pop_last(self) -> None:
        """Remove the most recent token (used by :meth:`Control.replace_last`)."""
        sampled = bool(self.forced) and not self.forced[-1]
        if sampled and len(self.logprobs) == self.n_generated:
            self.logprobs.pop()
            if self.top_logprobs:
                self.top_logprobs.pop()
        for seq in (self.tokens, self.pieces, self.forced, self.times):
            seq.pop()
        self.n_generated -= sampled

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class SampleResult:
    rows: list[Row]
    prompt_tokens: int
    ttft: float  # seconds from the call to the first sampled token
    wall: float
    steps: int  # decode calls after the prompt

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]


class Control:
    """What a controller may do to the rows of a running :meth:`Engine.sample` call."""

    def __init__(self, rows: list[Row], started: float):
        self.rows = rows
        self.started = started
        self.pending: dict[int, str] = {}
        self.extra: dict[int, int] = {}
        self.retract: set[int] = set()
        self.probes: list[tuple[int, str, int, object, int]] = []
        self.all_stopped = False
        # Seconds from the prompt's first decoded chunk to its last (None where the engine cannot
        # tell): what a controller divides by the prompt's tokens for the cost of one, without the
        # time the call waited in a shared batch's queue before its prefill began.
        self.prefill_s: float | None = None
        # The engine's estimate of one step of this call now (a shared batch: one of its rounds at the
        # current load; None where the engine has none).  A controller times the call's answer by it: the
        # time between the call's own steps counts the rounds a batch left it out of, which its last
        # rounds (every round) do not cost; without it, by its own running estimate of those times.
        self.step_s: float | None = None
        self.stall_s: float | None = None  # and of a wait beyond a step that a call should expect to meet

    def live(self) -> list[Row]:
        return [r for r in self.rows if not r.finished]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stop(self, row: int, reason: str = "stopped") -> None:
        r = self.rows[row]
        if not r.finished:
            r.finished, r.finish_reason = True, reason
        self.pending.pop(row, None)
        self.extra.pop(row, None)
        self.retract.discard(row)

    def replace_last(self, row: int, text: str) -> None:
        """Drop the token ``row`` sampled in this step and force ``text`` in its place.

        This is how budget forcing extends thinking: an early end-of-thinking token is
        replaced by "Wait".  Only the token of the current step can be replaced (it has not
        been decoded yet), so this costs nothing.
        """
        self.retract.add(row)
        self.force(row, text)

    def probe(self, row: int, text: str, max_tokens: int, label: object, seed: int = 0) -> None:
        """Branch ``row`` here, force ``text`` in the branch and decode up to ``max_tokens`` there.

        The row itself is not disturbed: it keeps its cache, its sampler and its tokens.  The
        branch's text and token count land in ``row.probes[label]`` before the next step.
        This is how one long row tells what it would have answered if cut at a smaller budget.
        """
        if self.rows[row].finished:
            raise EngineError(f"row {row} is finished; it cannot be branched")
        self.probes.append((row, text, max_tokens, label, seed))

    def stop_all(self, reason: str = "stopped") -> None:
        for r in self.rows:
            self.stop(r.index, reason)
        self.all_stopped = True

    def force(self, row: int, text: str, extra_tokens: int = 0) -> None:
        """Queue ``text`` for ``row`` before its next sampled token, and grant it ``extra_tokens``.

        A row that reached its token budget in this very step may still be forced: that is
        how a budget is enforced (cut, force the answer prefix, allow a few answer tokens).
        """
        r = self.rows[row]
        if r.finished:
            raise EngineError(f"row {row} is finished; nothing can be forced into it")
        self.pending[row] = self.pending.get(row, "") + text
        self.extra[row] = self.extra.get(row, 0) + extra_tokens


Controller = Callable[[Control, list[int]], None]
"""Called after each step with the indices of rows that received a token in that step."""


class Engine(ABC):
    """Base class: subclasses set the capability flags and implement :meth:`sample`."""

    name: ClassVar[str] = ""
    parallel_rows: ClassVar[bool] = False  # N rows decode in one batch sharing one prefill
    forced_tokens: ClassVar[bool] = False  # Control.force is honoured mid-generation
    probes: ClassVar[bool] = False  # Control.probe branches a row without disturbing it
    logprobs: ClassVar[bool] = False  # per-token log-probabilities are reported
    steppable: ClassVar[bool] = False  # the controller is called after every step
    needs_url: ClassVar[bool] = False  # runs behind a server (the spec's url), not on a local artifact
    options: ClassVar[dict[str, type]] = {}  # spec options the engine takes, with their types

    @classmethod
    def probes_for(cls, spec) -> bool:
        """Whether an engine opened from ``spec`` can probe (its options may take that away)."""
        return cls.probes

    @classmethod
    def open(cls, spec, plan) -> Engine:
        """The engine for an :class:`~edgetts.engines.spec.EngineSpec`, sized by a ``ContextPlan``.

        Callers use :func:`edgetts.engines.open_engine`, which validates the spec first.
        """
        raise EngineError(f"engine {cls.name!r} cannot be opened from a spec")

    @abstractmethod
    def sample(
        self,
        prompt: str,
        n: int,
        params: SamplingParams,
        controller: Controller | None = None,
        seeds: list[int] | None = None,
    ) -> SampleResult:
        """``n`` continuations of ``prompt`` (a raw prompt: apply a chat template first)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no begin-of-sequence token (special tokens parsed)."""

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (for budgets)."""
        return len(self.tokenize(text))

    def chat_template(self) -> str | None:
        """The model's chat template (Jinja2), if it ships one."""
        return None

    def model_name(self) -> str | None:
        """The model's own name (GGUF ``general.name``), if it states one."""
        return None

    def settings(self) -> dict:
        """The run-time settings this engine runs under (threads, layers on the GPU...), as it resolved
        them: what profiles record as ``profiled_with`` and the runtime compares with it."""
        return {}

    def close(self) -> None:  # noqa: B027 - engines without native resources need nothing here
        """Release native resources; the engine is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
