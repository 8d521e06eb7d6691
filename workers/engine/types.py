"""Requests, results and the event sink an engine works with."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas.events import Done, ErrorEvent

# llama-server's sampling defaults, used where a request and the model config
# say nothing.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_LAST_N = 64

# Request priorities: interactive requests always go first; bulk lines take
# only slots no interactive request is waiting for, and give them back.
INTERACTIVE = 0
BULK = 1


@dataclass(frozen=True, slots=True)
class Sampling:
    """Resolved sampling settings of one request (every choice shares them)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    typical_p: float = 1.0
    min_keep: int = 0
    repeat_penalty: float = 1.0
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
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


class InvalidSlot(ValueError):
    def __init__(self, slot: int, slots: int) -> None:
        super().__init__(f"id_slot {slot} does not exist: this worker has slots 0 to {slots - 1}")
