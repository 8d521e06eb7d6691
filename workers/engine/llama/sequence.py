"""Book-keeping of the requests and sequences an engine is running.

A request (Group) asks for n choices; each choice is one Sequence in its own
slot. The first sequence evaluates the prompt; its siblings wait, then take a
copy of its KV cache and sample their first token from the same logits."""

from __future__ import annotations

import array
import time
from dataclasses import dataclass, field
from typing import Any

from schemas.events import ChoiceResult, Done
from workers.engine.llama.text import TextAssembler
from workers.engine.types import EngineRequest, answer


@dataclass(eq=False)
class Group:
    request: EngineRequest
    tokens_cached: int = 0
    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    n_generated: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # When the prompt's first chunk went into a batch, and when its logits came.
    prompt_started: float | None = None
    prompt_done: float | None = None
    # Beam search state (workers.engine.llama.beam.BeamState), when beams are searched.
    beam: Any = None
    # KV cells reserved for it (workers.engine.llama.slots) and the prefix
    # cache entries it shares cells with, held until its last sequence ends.
    reserved: int = 0
    pins: list[Any] = field(default_factory=list)
    # The engine step that last decoded one of its tokens (bulk fairness).
    last_step: int = 0

    @property
    def n(self) -> int:
        return self.request.sampling.n

    @property
    def complete(self) -> bool:
        return len(self.choices) == self.n

    def result(self) -> Done:
        prompt_ms = None
        if self.prompt_started is not None and self.prompt_done is not None:
            prompt_ms = (self.prompt_done - self.prompt_started) * 1000
        return answer(
            self.request,
            self.choices,
            n_generated=self.n_generated,
            started=self.started,
            first_token_at=self.first_token_at,
            tokens_cached=self.tokens_cached,
            prompt_ms=prompt_ms,
        )


@dataclass(eq=False)
class Sequence:
    group: Group
    index: int
    slot: int
    sampler: Any
    max_tokens: int
    text: TextAssembler
    # Set on siblings until the primary's prompt is in the cache.
    fork_of: Sequence | None = None
    n_evaluated: int = 0  # prompt tokens in this slot's KV cache
    n_generated: int = 0
    last_token: int = -1
    logits_index: int = -1
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def request(self) -> EngineRequest:
        return self.group.request

    @property
    def prefilling(self) -> bool:
        return self.fork_of is None and self.n_evaluated < len(self.request.prompt_tokens)

    @property
    def generating(self) -> bool:
        return self.fork_of is None and not self.prefilling

    @property
    def waiting(self) -> bool:
        return self.fork_of is not None

    @property
    def position(self) -> int:
        """Position of the next token to decode."""
        return self.n_evaluated + max(self.n_generated - 1, 0)

    def finish(self, reason: str, stop_type: str | None = None) -> ChoiceResult:
        stream = self.request.streams
        return ChoiceResult(
            index=self.index,
            finish_reason=reason,
            text=None if stream else self.text.text,
            logprobs=None if stream or self.request.sampling.logprobs is None else self.logprobs,
            stop_type=stop_type,
            stopping_word=self.text.stop_word if stop_type == "word" else None,
            slot=self.slot,
        )


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return shared_length(token_bytes(a), token_bytes(b))


def token_bytes(tokens: list[int]) -> bytes:
    """Token ids as 4-byte machine integers, for shared_length."""
    return array.array("i", tokens).tobytes()


def shared_length(a: bytes, b: bytes) -> int:
    """How many leading tokens two token_bytes() share: a binary search of
    slice comparisons (memcmp), so matching a prompt against many cached
    prefixes costs microseconds, not a Python loop per token."""
    va, vb = memoryview(a), memoryview(b)
    lo, hi = 0, min(len(a), len(b)) // 4
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if va[: mid * 4] == vb[: mid * 4]:
            lo = mid
        else:
            hi = mid - 1
    return lo
