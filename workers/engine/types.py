"""Requests, results and the event sink an engine works with, whichever
engine it is (nothing here knows llama.cpp)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from schemas.events import ChoiceResult, Done, ErrorEvent, Usage

# Where EngineRequest and EmbedRequest report a failing finish callback, as
# their engines log.
log = logging.getLogger("inferq.engine")
embed_log = logging.getLogger("inferq.embedding")

# Request priorities: interactive requests always go first; bulk lines take
# only slots no interactive request is waiting for, and give them back.
INTERACTIVE = 0
BULK = 1

# How long a request may take once a worker took it, beyond the queueing
# bound the caller gives (see time_budget): generous per token, so that only
# a wedged engine ever reaches it, but never unbounded.
PROMPT_TOKEN_BUDGET_S = 0.05
TOKEN_BUDGET_S = 1.0
# After its budget, a request is expired: the engine ends it at its next
# step; if the engine does not within this, the waiter ends it itself.
EXPIRE_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class Sampling:
    """The resolved sampling settings an engine runs one request with (every
    choice shares them): a job's SamplingOptions with each default filled in,
    text biases already token ids, and the beam settings. Built by
    workers.engine.options.resolve, with each engine's own grammar (llama.cpp
    turns a JSON schema into GBNF; vLLM takes it as it is).

    The defaults below are llama-server's, declared here only: what a
    request and the model's config leave unset runs with them."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    min_keep: int = 0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    # (token id, bias); -inf bans the token.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # GBNF, already converted from a JSON schema where one was given.
    grammar: str | None = None
    # A JSON schema (as JSON text) for engines that take one as it is (vLLM);
    # None where the engine turned it into `grammar`.
    json_schema: str | None = None
    # Log-probabilities of the chosen token plus this many alternatives;
    # None: no log-probabilities at all.
    logprobs: int | None = None
    ignore_eos: bool = False
    n: int = 1
    cache_prompt: bool = True
    # Beam search over n parallel beams instead of sampling.
    beam: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # The sampler chain in this order (llama-server's `samplers`, canonical
    # names); None: llama-server's default order.
    samplers: tuple[str, ...] | None = None


class EventSink(Protocol):
    """Receives the events of one engine step as (request id, encoded event)."""

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None: ...


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    prompt_tokens: list[int]
    sampling: Sampling
    # Streamed requests get one event per token; the others one final event.
    stream: bool = True
    # Run on this slot (llama-server's id_slot); None: whichever suits best.
    id_slot: int | None = None
    result: Done | ErrorEvent | None = None
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    priority: int = INTERACTIVE
    # False: no event reaches the sink; the result is only in `result` (bulk
    # lines, which nobody streams).
    publish: bool = True
    # Called on the engine thread once `finished` is set; must be cheap.
    on_finish: Callable[[EngineRequest], None] | None = None
    # True while the request holds slots: set at admission, False again when
    # it is preempted or has finished. Only the engine thread writes it.
    admitted: bool = False
    # Submission order, set by the engine: a preempted request goes back to
    # its place in the queue, ahead of the bulk requests that came after it.
    arrival: int = 0
    # Why the request ran out of time (set by LlamaEngine.expire); the engine
    # then ends it with a 504 error instead of a cancelled answer.
    expired: str | None = None
    _settle_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def streams(self) -> bool:
        """Tokens go out one event each (an unpublished request's never do: its
        choices then carry their whole text, as a non-streamed one's)."""
        return self.stream and self.publish

    def cancel(self) -> None:
        # Read by the engine thread at its next step; a bool store is atomic.
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Done | ErrorEvent | None:
        self.finished.wait(timeout)
        return self.result

    def settle(self, result: Done | ErrorEvent) -> bool:
        """Set the terminal result unless one is set already: every request
        ends exactly once, whichever thread (engine or waiter) gets there first."""
        with self._settle_lock:
            if self.result is not None:
                return False
            self.result = result
            return True

    def done(self) -> None:
        """Wake the waiter, then run the finish callback (on the engine
        thread, after the request's end was published)."""
        self.finished.set()
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:
                log.exception("finish callback of %s failed", self.request_id)


def answer(
    request: EngineRequest,
    choices: dict[int, ChoiceResult],
    *,
    n_generated: int,
    started: float,
    first_token_at: float | None,
    tokens_cached: int,
    prompt_ms: float | None,
) -> Done:
    """The Done of a request whose choices ended, timed from `started` (a
    time.perf_counter reading) to now."""
    now = time.perf_counter()
    ttft = None if first_token_at is None else (first_token_at - started) * 1000
    return Done(
        choices=[choices[i] for i in sorted(choices)],
        usage=Usage(len(request.prompt_tokens), n_generated),
        ttft_ms=ttft,
        duration_ms=(now - started) * 1000,
        tokens_cached=tokens_cached,
        prompt_ms=prompt_ms,
    )


def time_budget(
    request: EngineRequest,
    *,
    queue_timeout: float,
    n_ctx: int,
    prompt_token_s: float = PROMPT_TOKEN_BUDGET_S,
    token_s: float = TOKEN_BUDGET_S,
) -> float:
    """Seconds a caller waits for `request` at most: `queue_timeout` for a slot,
    plus a generous allowance per prompt token and per token it may generate
    (up to the context when it sets no max_tokens), per choice."""
    prompt = len(request.prompt_tokens)
    sampling = request.sampling
    limit = sampling.max_tokens if sampling.max_tokens is not None else n_ctx - prompt
    tokens = max(limit, 1) * max(sampling.n, 1)
    return max(0.0, queue_timeout + prompt_token_s * prompt + token_s * tokens)


def check_fits(
    prompt_tokens: int, max_tokens: int | None, n: int, *, n_ctx: int, n_slots: int
) -> None:
    """Raise unless the prompt (+ max_tokens) fits a slot of `n_ctx` tokens
    and `n` slots exist."""
    needed = prompt_tokens + (max_tokens or 1)
    if prompt_tokens == 0 or needed > n_ctx:
        raise ContextLengthExceeded(prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=n_ctx)
    if n > n_slots:
        raise TooManyChoices(n, n_slots)


class ContextLengthExceeded(ValueError):
    def __init__(self, *, prompt_tokens: int, max_tokens: int | None, n_ctx: int) -> None:
        requested = prompt_tokens + (max_tokens or 0)
        detail = f"{prompt_tokens} in the prompt" + (
            f", {max_tokens} for the completion" if max_tokens else ""
        )
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, you "
            f"requested {requested} tokens ({detail}). Please reduce the length of "
            "the prompt or of max_tokens."
        )


class TooManyChoices(ValueError):
    def __init__(self, n: int, slots: int) -> None:
        super().__init__(f"n={n} needs {n} parallel slots; this model has {slots}")


class KvCacheExceeded(ContextLengthExceeded):
    """A request whose choices together need more cells than the KV cache has."""

    def __init__(self, needed: int, kv_cells: int) -> None:
        ValueError.__init__(
            self,
            f"This request needs up to {needed} tokens of KV cache (its prompt plus "
            f"max_tokens for each choice); this model holds {kv_cells}. Please reduce "
            "max_tokens, n or the prompt.",
        )


class InvalidSlot(ValueError):
    def __init__(self, slot: int, slots: int) -> None:
        super().__init__(f"id_slot {slot} does not exist: this worker has slots 0 to {slots - 1}")


@dataclass(eq=False)
class EmbedRequest:
    """Token lists in; one vector per input out (L2-normalised when
    `normalize`; rank pooling gives one score per input instead)."""

    inputs: list[list[int]]
    normalize: bool = True
    vectors: list[npt.NDArray[np.float32]] = field(default_factory=list)
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    _out: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)
    # Bulk inputs are packed only after every waiting interactive input.
    priority: int = INTERACTIVE
    # Called on the engine thread once `finished` is set; must be cheap.
    on_finish: Callable[[EmbedRequest], None] | None = None

    def done(self) -> None:
        if self.finished.is_set():
            return  # a failed decode ends each request once, whatever it packed
        self.finished.set()
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:
                embed_log.exception("embedding finish callback failed")

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)


def cosine(a: Any, b: Any) -> float:
    va: Any = np.asarray(a)
    vb: Any = np.asarray(b)
    denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(np.dot(va, vb) / denom) if denom else 0.0
