"""The llama.cpp engine's counters, what its heartbeat reports (GET /metrics
shows them under llama.cpp's own names).

The engine thread only adds integers and, once per step, a few floats: no
lock, no allocation, nothing per token beyond `tokens_generated += 1`. The
heartbeat thread reads them as they are (a figure a step behind is fine)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Protocol

from schemas.worker_stats import WorkStats


class _InSlot(Protocol):
    @property
    def group(self) -> object: ...


@dataclass
class EngineStats:
    # Successful llama_decode calls, and the busy slots summed over them.
    steps: int = 0
    busy_slots: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_cached: int = 0
    tokens_generated: int = 0
    preempted: int = 0
    # Bulk-only steps given up for an interactive arrival.
    aborted: int = 0
    # Seconds each sequence spent in steps evaluating its prompt, and in
    # steps generating (summed over sequences, as llama.cpp sums its slots).
    prompt_seconds: float = 0.0
    predicted_seconds: float = 0.0
    # When the step under way began, and the prompt tokens counted before it.
    _step_started: float = 0.0
    _step_prompt_tokens: int = 0

    def begin_step(self) -> None:
        self._step_started = time.perf_counter()
        self._step_prompt_tokens = self.prompt_tokens_evaluated

    def decoded(self, busy: int) -> None:
        """A llama_decode succeeded with `busy` sequences in slots."""
        self.steps += 1
        self.busy_slots += busy

    def end_step(self, n_tokens: int, n_sequences: int) -> None:
        """The step decoded `n_tokens` tokens of `n_sequences` sequences and
        sampled them. A generating sequence adds one token to a batch and a
        prompt chunk the rest, so the prompt tokens counted since
        begin_step tell how many of the sequences were generating."""
        elapsed = time.perf_counter() - self._step_started
        prompt = self.prompt_tokens_evaluated - self._step_prompt_tokens
        generating = n_tokens - prompt
        self.predicted_seconds += elapsed * generating
        self.prompt_seconds += elapsed * (n_sequences - generating)


def snapshot(
    stats: EngineStats,
    kv_tokens: int,
    kv_capacity: int,
    active: Iterable[_InSlot],
    waiting: Iterable[Sized],
) -> WorkStats:
    """The engine's figures now: `kv_tokens` of the KV cache's `kv_capacity`
    cells in use; `active`, the sequences in slots; `waiting`, the queues of
    requests not admitted yet. Called from the heartbeat thread while the
    engine thread runs: lists are copied (one C-level call) before they are
    walked, and a figure a step old is fine."""
    return WorkStats(
        prompt_tokens=stats.prompt_tokens_evaluated,
        prompt_seconds=stats.prompt_seconds,
        predicted_tokens=stats.tokens_generated,
        predicted_seconds=stats.predicted_seconds,
        decodes=stats.steps,
        busy_slots=stats.busy_slots,
        kv_tokens=kv_tokens,
        kv_capacity=kv_capacity,
        processing=len({id(seq.group) for seq in list(active)}),
        deferred=sum(len(queue) for queue in waiting),
    )
