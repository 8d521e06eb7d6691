"""Continuous batching over one llama.cpp context.

One engine thread owns the context. Every step it decodes, in a single
`llama_decode`, the next token of every generating sequence plus chunks of
the prompts still being evaluated, then samples each sequence with its own
sampler chain. Requests join between steps and leave as soon as they finish,
freeing their slots; a slot keeps its KV cache so that the next prompt with
the same prefix only evaluates the rest."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from schemas.events import (
    ChoiceResult,
    Done,
    ErrorEvent,
    Usage,
    encode,
    encode_token,
    encode_token_logprobs,
)
from workers.engine import beam
from workers.engine.admission import next_request, preempt_for_interactive
from workers.engine.beam import BeamState
from workers.engine.llama_model import LlamaModel
from workers.engine.sampling import build_chain, choice_seed, logprob_entry
from workers.engine.sequence import Group, Sequence
from workers.engine.slots import Slots
from workers.engine.text import TextAssembler
from workers.engine.types import (
    INTERACTIVE,
    ContextLengthExceeded,
    EngineRequest,
    EventSink,
    InvalidSlot,
    TooManyChoices,
)

log = logging.getLogger("inferq.engine")

Out = list[tuple[str, bytes]]


def _slot_of(seq: Sequence) -> int:
    return seq.slot


def _priority_of(seq: Sequence) -> int:
    return seq.request.priority


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_cached: int = 0
    tokens_generated: int = 0
    preempted: int = 0


class LlamaEngine:
    def __init__(self, model: LlamaModel, sink: EventSink) -> None:
        self.model = model
        self.sink = sink
        self.n_slots = model.n_slots
        self.n_ctx_per_slot = model.n_ctx_per_slot
        self.stats = EngineStats()
        self._incoming: collections.deque[EngineRequest] = collections.deque()
        self._arrivals = itertools.count(1)
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._wake = threading.Condition()
        # Tokens whose KV entries each slot holds, for prompt prefix reuse.
        self._slots = Slots(model)
        self._active: list[Sequence] = []
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

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> None:
        """Raise unless the prompt (+ max_tokens) fits a slot and n slots exist."""
        needed = prompt_tokens + (max_tokens or 1)
        if prompt_tokens == 0 or needed > self.n_ctx_per_slot:
            raise ContextLengthExceeded(
                prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=self.n_ctx_per_slot
            )
        if n > self.n_slots:
            raise TooManyChoices(n, self.n_slots)

    def submit(self, *requests: EngineRequest) -> None:
        """Queue requests; several given together join the same step."""
        for request in requests:
            sampling = request.sampling
            self.check_fits(len(request.prompt_tokens), sampling.max_tokens, sampling.n)
            if request.id_slot is not None and not 0 <= request.id_slot < self.n_slots:
                raise InvalidSlot(request.id_slot, self.n_slots)
        with self._wake:
            for request in requests:
                request.arrival = next(self._arrivals)
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
            out: Out = []
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
            self._finish(request, ErrorEvent("worker shutting down", status=503), out)
        self._flush(out)

    def _flush(self, out: Out) -> None:
        if out:
            try:
                self.sink.publish(out)
            except Exception:
                log.exception("publishing events failed")
        # Waiters learn of the end only after its event went out, so a job is
        # never acknowledged before its client could hear the result.
        for request in self._finished:
            request.finished.set()
            if request.on_finish is not None:
                try:
                    request.on_finish(request)
                except Exception:
                    log.exception("finish callback of %s failed", request.request_id)
        self._finished.clear()

    def _admit(self, out: Out) -> None:
        for cancelled in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(cancelled)
            self._finish(cancelled, _cancelled(cancelled), out)
        self.stats.preempted += preempt_for_interactive(
            self._waiting, self._active, len(self._slots.free), self._give_back
        )
        while (request := next_request(self._waiting, self._slots.free)) is not None:
            self._waiting.remove(request)
            request.admitted = True
            group = Group(request)
            if request.sampling.beam:
                group.beam = BeamState(
                    width=request.sampling.n,
                    length_penalty=request.sampling.length_penalty,
                    early_stopping=request.sampling.early_stopping,
                    max_tokens=request.sampling.max_tokens
                    or (self.n_ctx_per_slot - len(request.prompt_tokens)),
                )
            prompt = request.prompt_tokens
            primary_slot, reused = self._slots.pick(
                prompt, request.sampling.cache_prompt, request.id_slot
            )
            group.tokens_cached = reused
            self.stats.prompt_tokens_cached += reused
            primary = self._new_sequence(group, 0, primary_slot)
            primary.n_evaluated = reused
            self._active.append(primary)
            for index in range(1, request.sampling.n):
                slot = self._slots.take_lowest()
                sibling = self._new_sequence(group, index, slot)
                sibling.fork_of = primary
                self._active.append(sibling)

    def _give_back(self, group: Group) -> int:
        """Preemption: free a bulk group's slots, keeping their cache for reuse."""
        seqs = [s for s in self._active if s.group is group]
        for seq in seqs:
            self._release(seq)
        return len(seqs)

    def _new_sequence(self, group: Group, index: int, slot: int) -> Sequence:
        request = group.request
        sampling = request.sampling
        prompt = request.prompt_tokens
        chain = build_chain(
            sampling,
            vocab=self.model.vocab,
            n_vocab=self.model.n_vocab,
            seed=choice_seed(sampling.seed, index),
            history=prompt,
            banned=self.model.eog_tokens() if sampling.ignore_eos else [],
        )
        return Sequence(
            group=group,
            index=index,
            slot=slot,
            sampler=chain,
            max_tokens=(
                sampling.max_tokens
                if sampling.max_tokens is not None
                else self.n_ctx_per_slot - len(prompt)
            ),
            text=TextAssembler(sampling.stop),
        )

    def _step(self, out: Out) -> None:
        for seq in [s for s in self._active if s.request.cancelled]:
            if seq in self._active:
                self._cancel_group(seq.group, out)
        if not self._active:
            return
        # Generating sequences get one token each, so every stream moves every
        # step; prompt chunks fill the rest of the batch (first come, first
        # served, interactive prompts before bulk ones), so a long prompt is
        # spread over several steps instead of stalling the streams already
        # running, and a bulk prompt never delays an interactive first token.
        # While an interactive prompt is evaluated, bulk sequences sit the step
        # out: the step is then that prompt (and the interactive streams) only,
        # so a running batch delays a first token by about the step already
        # under way, not by two full steps. Bulk work loses one step per
        # arriving interactive request.
        hold = any(s.prefilling and s.request.priority == INTERACTIVE for s in self._active)
        stepping = [s for s in self._active if not (hold and s.request.priority > INTERACTIVE)]
        budget = self.model.n_batch - sum(1 for s in stepping if s.generating)
        chunks: dict[int, int] = {}
        for seq in sorted(stepping, key=_priority_of):
            if budget > 0 and seq.prefilling:
                take = min(budget, len(seq.request.prompt_tokens) - seq.n_evaluated)
                chunks[id(seq)] = take
                budget -= take
        # Laid out in ascending slot order: without a unified KV cache
        # llama.cpp only puts consecutive sequence ids into one micro-batch,
        # and every extra micro-batch is another pass over the weights.
        n = 0
        batch = self._batch
        completed: list[Sequence] = []
        for seq in self._active:
            seq.logits_index = -1
        for seq in sorted(stepping, key=_slot_of):
            if seq.generating:
                self._tokens[n] = seq.last_token
                self._pos[n] = seq.position
                batch.seq_id[n][0] = seq.slot
                self._logits[n] = 1
                self._slots.tokens[seq.slot].append(seq.last_token)
                seq.logits_index = n
                n += 1
                continue
            take = chunks.get(id(seq), 0)
            if take == 0:
                continue
            if seq.group.prompt_started is None:
                seq.group.prompt_started = _now()
            prompt = seq.request.prompt_tokens
            start = seq.n_evaluated
            self._tokens[n : n + take] = prompt[start : start + take]
            self._pos[n : n + take] = np.arange(start, start + take, dtype=np.int32)
            self._logits[n : n + take] = 0
            for i in range(n, n + take):
                batch.seq_id[i][0] = seq.slot
            self._slots.tokens[seq.slot].extend(prompt[start : start + take])
            seq.n_evaluated += take
            self.stats.prompt_tokens_evaluated += take
            n += take
            if not seq.prefilling:
                self._logits[n - 1] = 1
                seq.logits_index = n - 1
                completed.append(seq)
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.model.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.stats.steps += 1
        for primary in completed:
            primary.group.prompt_done = _now()
            self._fork(primary)
        beams: dict[int, list[Sequence]] = {}
        for seq in list(self._active):
            if seq.group.beam is not None and seq.logits_index >= 0:
                beams.setdefault(id(seq.group), []).append(seq)
                continue
            if seq.logits_index >= 0 and seq in self._active:
                token = llama_cpp.llama_sampler_sample(
                    seq.sampler, self.model.ctx, seq.logits_index
                )
                self._on_token(seq, int(token), out)

        for group_seqs in beams.values():
            self._advance_beams(sorted(group_seqs, key=lambda s: s.index), out)

    def _advance_beams(self, seqs: list[Sequence], out: Out) -> None:
        group = seqs[0].group
        if group.first_token_at is None:
            group.first_token_at = _now()
        results = beam.advance(self, group, seqs)
        if results is None:
            return
        for seq in [s for s in self._active if s.group is group]:
            self._release(seq)
        group.n_generated = sum(r.n_tokens or 0 for r in results)
        self.stats.tokens_generated += group.n_generated
        for result in results:
            group.choices[result.index] = result
        # Fewer hypotheses than beams can come back (all ended at once).
        for index in range(len(results), group.n):
            group.choices[index] = ChoiceResult(index=index, finish_reason="stop", text="")
        self._finish(group.request, group.result(), out)

    def drop_beam(self, seq: Sequence) -> None:
        """A beam the search no longer continues frees its slot."""
        self._release(seq, keep_cache=False)

    def copy_slot_tokens(self, source: int, target: int) -> None:
        """Beam search copied one slot's KV cache into another."""
        self._slots.copy(source, target)

    def _fork(self, primary: Sequence) -> None:
        """Siblings of a request take a copy of its evaluated prompt (the copy
        happens inside the next decode) and sample from the same logits.
        Beams are copied by the beam step itself, into just the slots that
        need one, so a whole-stream copy is not made here first."""
        for seq in self._active:
            if seq.fork_of is primary:
                if primary.group.beam is None:
                    llama_cpp.llama_memory_seq_cp(self.model.memory, primary.slot, seq.slot, -1, -1)
                    self._slots.copy(primary.slot, seq.slot)
                seq.fork_of = None
                seq.n_evaluated = primary.n_evaluated
                seq.logits_index = primary.logits_index

    def _on_token(self, seq: Sequence, token: int, out: Out) -> None:
        request = seq.request
        group = seq.group
        if seq.max_tokens == 0:
            # llama.cpp's n_predict 0: the prompt is in the cache, nothing more.
            self._complete(seq, "length", out, "limit")
            return
        if group.first_token_at is None:
            group.first_token_at = _now()
        if request.sampling.logprobs is not None:
            entry = logprob_entry(
                self.model, seq.logits_index, token, seq.request.sampling.logprobs or 0
            )
        if self.model.is_eog(token):
            self._complete(seq, "stop", out, "eos")
            return
        seq.n_generated += 1
        group.n_generated += 1
        self.stats.tokens_generated += 1
        seq.last_token = token
        text = seq.text.push(self.model.piece(token))
        if request.sampling.logprobs is not None:
            seq.logprobs.append(entry)
            seq.pending_logprobs.append(entry)
        if request.streams:
            self._emit(seq, text, out)
        if seq.text.stopped:
            self._complete(seq, "stop", out, "word")
        elif (
            seq.n_generated >= seq.max_tokens
            or len(request.prompt_tokens) + seq.n_generated >= self.n_ctx_per_slot
        ):
            self._complete(seq, "length", out, "limit")

    def _emit(self, seq: Sequence, text: str, out: Out) -> None:
        request_id = seq.request.request_id
        if seq.request.sampling.logprobs is None:
            if text:
                out.append((request_id, encode_token(seq.index, text)))
        elif text or seq.text.stopped:
            out.append((request_id, encode_token_logprobs(seq.index, text, seq.pending_logprobs)))
            seq.pending_logprobs = []

    def _complete(self, seq: Sequence, reason: str, out: Out, stop_type: str) -> None:
        if not seq.text.stopped:
            tail = seq.text.finish()
            if seq.request.streams and (tail or seq.pending_logprobs):
                self._emit(seq, tail, out)
        seq.group.choices[seq.index] = seq.finish(reason, stop_type)
        self._release(seq)
        if seq.group.complete:
            self._finish(seq.request, seq.group.result(), out)

    def _cancel_group(self, group: Group, out: Out) -> None:
        for seq in [s for s in self._active if s.group is group]:
            self._release(seq)
        result = group.result()
        choices = [ChoiceResult(index=i, finish_reason="cancelled") for i in range(group.n)]
        self._finish(group.request, Done(choices, result.usage, None, result.duration_ms), out)

    def _fail(self, seq: Sequence, out: Out, message: str, status: int = 500) -> None:
        for other in [s for s in self._active if s.group is seq.group]:
            self._release(other, keep_cache=False)
        self._finish(seq.request, ErrorEvent(message=message, status=status), out)

    def _release(self, seq: Sequence, *, keep_cache: bool = True) -> None:
        self._active.remove(seq)
        llama_cpp.llama_sampler_free(seq.sampler)
        keep = keep_cache and seq.request.sampling.cache_prompt and not seq.waiting
        self._slots.release(seq.slot, keep_cache=keep)

    def _finish(self, request: EngineRequest, result: Done | ErrorEvent, out: Out) -> None:
        if request.result is not None:
            return
        request.result = result
        request.admitted = False  # its slots are released by now
        if request.publish:
            out.append((request.request_id, encode(result)))
        self._finished.append(request)


def _cancelled(request: EngineRequest) -> Done:
    choices = [ChoiceResult(index=i, finish_reason="cancelled") for i in range(request.sampling.n)]
    return Done(choices=choices, usage=Usage(len(request.prompt_tokens), 0))


def _now() -> float:
    return time.perf_counter()
