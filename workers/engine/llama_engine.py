"""Continuous batching over one llama.cpp context.

One engine thread owns the context. Every step it decodes, in a single
`llama_decode`, the next token of every generating sequence plus chunks of
the prompts still being evaluated, then samples each sequence with its own
sampler chain. Requests join between steps and leave as soon as they finish,
freeing their slot and KV cells."""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from schemas.events import ChoiceResult, Done, ErrorEvent, Usage, encode, encode_token
from workers.engine.llama_model import LlamaModel
from workers.engine.text import TextAssembler
from workers.engine.types import (
    ContextLengthExceeded,
    EngineRequest,
    EventSink,
    Sampling,
)

log = logging.getLogger("inferq.engine")


def build_sampler(sampling: Sampling) -> Any:
    """A sampler chain for one sequence (llama_sampler_p)."""
    chain: Any = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.temperature <= 0.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    # llama.cpp's default order: top_k, top_p, min_p, temperature, then draw.
    if sampling.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1)
        )
    if sampling.min_p > 0.0:
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1)
        )
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_temp(sampling.temperature)
    )
    seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


@dataclass(eq=False)
class _Sequence:
    request: EngineRequest
    slot: int
    sampler: Any  # llama_sampler_p
    max_tokens: int
    text: TextAssembler
    n_evaluated: int = 0  # prompt tokens already in the KV cache
    n_generated: int = 0
    last_token: int = -1
    logits_index: int = -1
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_evaluated < len(self.request.prompt_tokens)

    @property
    def position(self) -> int:
        # Position of the next token to decode.
        return self.n_evaluated + max(self.n_generated - 1, 0)


class LlamaEngine:
    def __init__(self, model: LlamaModel, sink: EventSink) -> None:
        self.model = model
        self.sink = sink
        self.n_slots = model.n_slots
        self.n_ctx_per_slot = model.n_ctx_per_slot
        self._incoming: collections.deque[EngineRequest] = collections.deque()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._wake = threading.Condition()
        self._free_slots = list(range(self.n_slots - 1, -1, -1))
        self._active: list[_Sequence] = []
        self._finished: list[EngineRequest] = []
        self._stopping = False
        n_batch = model.n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        self._n_seq_id[:] = 1
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """Raise ContextLengthExceeded unless prompt (+ max_tokens) fits a slot."""
        needed = prompt_tokens + (max_tokens or 1)
        if prompt_tokens == 0 or needed > self.n_ctx_per_slot:
            raise ContextLengthExceeded(
                prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=self.n_ctx_per_slot
            )

    def submit(self, *requests: EngineRequest) -> None:
        """Queue requests; several given together join the same step."""
        for request in requests:
            self.check_fits(len(request.prompt_tokens), request.sampling.max_tokens)
        with self._wake:
            self._incoming.extend(requests)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        llama_cpp.llama_batch_free(self._batch)
        self.model.close()

    # -- engine thread --------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._incoming or self._active or self._waiting or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            out: list[tuple[str, bytes]] = []
            try:
                self._admit(out)
                if self._active:
                    self._step(out)
            except Exception as exc:  # a failed step must not kill the worker
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._fail(seq, out, f"inference failed: {exc}")
            self._flush(out)
        out = []
        for seq in list(self._active):
            self._fail(seq, out, "worker shutting down", status=503)
        for request in [*self._waiting, *self._incoming]:
            self._finish_request(request, ErrorEvent("worker shutting down", status=503), out)
        self._flush(out)

    def _flush(self, out: list[tuple[str, bytes]]) -> None:
        if out:
            try:
                self.sink.publish(out)
            except Exception:
                log.exception("publishing events failed")
        # Waiters learn of the end only after its event went out, so a job is
        # never acknowledged before its client could hear the result.
        for request in self._finished:
            request.finished.set()
        self._finished.clear()

    def _admit(self, out: list[tuple[str, bytes]]) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._finish_request(request, self._cancelled_result(request, 0, None, 0.0), out)
        while self._waiting and self._free_slots:
            request = self._waiting.popleft()
            slot = self._free_slots.pop()
            prompt = len(request.prompt_tokens)
            max_tokens = request.sampling.max_tokens or (self.n_ctx_per_slot - prompt)
            self.model.clear_slot(slot)
            self._active.append(
                _Sequence(
                    request=request,
                    slot=slot,
                    sampler=build_sampler(request.sampling),
                    max_tokens=max_tokens,
                    text=TextAssembler(request.sampling.stop),
                )
            )

    def _step(self, out: list[tuple[str, bytes]]) -> None:
        for seq in [s for s in self._active if s.request.cancelled]:
            self._release(seq)
            elapsed = (time.perf_counter() - seq.started) * 1000
            self._finish_request(
                seq.request,
                self._cancelled_result(seq.request, seq.n_generated, seq.first_token_at, elapsed),
                out,
            )
        if not self._active:
            return
        n = 0
        batch = self._batch
        # Generating sequences first: one token each keeps every stream moving.
        for seq in self._active:
            seq.logits_index = -1
            if not seq.prefilling:
                self._tokens[n] = seq.last_token
                self._pos[n] = seq.position
                batch.seq_id[n][0] = seq.slot
                self._logits[n] = 1
                seq.logits_index = n
                n += 1
        # Prompt chunks fill the rest of the batch, so a long prompt is spread
        # over several steps instead of stalling the streams already running.
        budget = self.model.n_batch - n
        for seq in self._active:
            if budget <= 0:
                break
            if not seq.prefilling:
                continue
            prompt = seq.request.prompt_tokens
            start = seq.n_evaluated
            take = min(budget, len(prompt) - start)
            self._tokens[n : n + take] = prompt[start : start + take]
            self._pos[n : n + take] = np.arange(start, start + take, dtype=np.int32)
            self._logits[n : n + take] = 0
            for i in range(n, n + take):
                batch.seq_id[i][0] = seq.slot
            seq.n_evaluated += take
            n += take
            budget -= take
            if not seq.prefilling:
                self._logits[n - 1] = 1
                seq.logits_index = n - 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.model.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for seq in list(self._active):
            if seq.logits_index >= 0:
                token = llama_cpp.llama_sampler_sample(
                    seq.sampler, self.model.ctx, seq.logits_index
                )
                self._on_token(seq, int(token), out)

    def _on_token(self, seq: _Sequence, token: int, out: list[tuple[str, bytes]]) -> None:
        request = seq.request
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if self.model.is_eog(token):
            self._complete(seq, "stop", out)
            return
        seq.n_generated += 1
        seq.last_token = token
        text = seq.text.push(self.model.piece(token))
        if text and request.stream:
            out.append((request.request_id, encode_token(0, text)))
        if seq.text.stopped:
            self._complete(seq, "stop", out)
        elif (
            seq.n_generated >= seq.max_tokens
            or len(request.prompt_tokens) + seq.n_generated >= self.n_ctx_per_slot
        ):
            self._complete(seq, "length", out)

    def _complete(self, seq: _Sequence, reason: str, out: list[tuple[str, bytes]]) -> None:
        if reason != "stop" or not seq.text.stopped:
            tail = seq.text.finish()
            if tail and seq.request.stream:
                out.append((seq.request.request_id, encode_token(0, tail)))
        self._release(seq)
        now = time.perf_counter()
        result = Done(
            choices=[
                ChoiceResult(
                    index=0,
                    finish_reason=reason,
                    text=None if seq.request.stream else seq.text.text,
                )
            ],
            usage=Usage(len(seq.request.prompt_tokens), seq.n_generated),
            ttft_ms=_ms(seq.first_token_at, seq.started),
            duration_ms=(now - seq.started) * 1000,
        )
        self._finish_request(seq.request, result, out)

    def _fail(
        self, seq: _Sequence, out: list[tuple[str, bytes]], message: str, status: int = 500
    ) -> None:
        self._release(seq)
        error = ErrorEvent(message=message, status=status)
        self._finish_request(seq.request, error, out)

    def _release(self, seq: _Sequence) -> None:
        self._active.remove(seq)
        llama_cpp.llama_sampler_free(seq.sampler)
        self.model.clear_slot(seq.slot)
        self._free_slots.append(seq.slot)

    @staticmethod
    def _cancelled_result(
        request: EngineRequest, generated: int, first: float | None, elapsed_ms: float
    ) -> Done:
        return Done(
            choices=[ChoiceResult(index=0, finish_reason="cancelled")],
            usage=Usage(len(request.prompt_tokens), generated),
            ttft_ms=None,
            duration_ms=elapsed_ms,
        )

    def _finish_request(
        self, request: EngineRequest, result: Done | ErrorEvent, out: list[tuple[str, bytes]]
    ) -> None:
        request.result = result
        out.append((request.request_id, encode(result)))
        self._finished.append(request)


def _ms(end: float | None, start: float) -> float | None:
    return None if end is None else (end - start) * 1000
