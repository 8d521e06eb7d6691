"""Continuous batching over one llama.cpp context.

One engine thread owns the context. Every step it decodes, in a single
`llama_decode`, the next token of every generating sequence plus chunks of
the prompts still being evaluated, then samples each sequence with its own
sampler chain. Requests join between steps and leave as soon as they finish,
freeing their slots; what they evaluated stays in the prefix cache, so the
next prompt with the same start only evaluates the rest. Interactive work
keeps its latency while bulk lines run (workers.engine.llama.pacing)."""

from __future__ import annotations

import collections
import itertools
import logging
import time

from schemas.events import Done, ErrorEvent
from schemas.jobs import GenerateJob
from schemas.registry import PREFIX_CACHE_TOKENS, ModelConfig
from schemas.worker_stats import WorkStats
from workers.engine.interface import InvalidRequest
from workers.engine.lifecycle import (
    SHUTTING_DOWN,
    EngineThread,
    abandon,
    cancelled_answer,
    error,
    wait_bounded,
)
from workers.engine.llama import beam, laid_out
from workers.engine.llama.admission import next_request, preempt_for_interactive, requeue
from workers.engine.llama.batch import Batch, plan
from workers.engine.llama.ending import Endings
from workers.engine.llama.limits import check_cells, check_request, safe_sampling
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.options import resolve_sampling
from workers.engine.llama.pacing import AbortFlag, Share, StepCost, StepTimes
from workers.engine.llama.prefix_cache import PrefixCache
from workers.engine.llama.sequence import Sequence
from workers.engine.llama.slots import Slots, is_bulk
from workers.engine.llama.starting import start
from workers.engine.llama.stats import EngineStats, snapshot
from workers.engine.llama.tokens import Out, take_token
from workers.engine.options import SamplingError
from workers.engine.types import (
    PROMPT_TOKEN_BUDGET_S,
    TOKEN_BUDGET_S,
    EngineRequest,
    EventSink,
    Sampling,
)

log = logging.getLogger("inferq.engine")


class LlamaEngine(Endings, EngineThread):
    """The llama.cpp GenerationEngine (workers.engine.interface)."""

    def __init__(
        self,
        model: LlamaModel,
        sink: EventSink,
        *,
        prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
        interactive_slowdown: float = 1.5,
    ) -> None:
        super().__init__("llama-engine")
        self.model = model
        self.sink = sink
        self.n_slots = model.n_slots
        self.n_ctx_per_slot = model.n_ctx_per_slot
        self.stats = EngineStats()
        self.slowdown = interactive_slowdown
        self._incoming: collections.deque[EngineRequest] = collections.deque()
        self._arrivals = itertools.count(1)
        self._steps = itertools.count(1)
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        first_holder = model.n_slots + model.n_bulk
        holders = list(range(first_holder, first_holder + model.n_holders))
        self.cache = PrefixCache(model, holders, min(prefix_cache_tokens, model.kv_cells))
        self._slots = Slots(model, self.cache)
        self._times = StepTimes()
        self._abort = AbortFlag(model.ctx)
        # An interactive request came in since the loop last took the queue
        # (read and written under _wake): a bulk-only step is not started.
        self._interactive_arrived = False
        self._active: list[Sequence] = []
        self._finished: list[EngineRequest] = []
        self._batch = Batch(model.n_batch)
        self._beams = beam.BeamHost(
            model, self.n_ctx_per_slot, copy_slot=self._copy_slot, drop_beam=self._drop_beam
        )
        self._thread.start()

    # -- public -------------------------------------------------------------

    @property
    def tokenizer(self) -> LlamaModel:
        return self.model

    def sampling_for(self, job: GenerateJob, config: ModelConfig) -> Sampling:
        """The job's sampling resolved for this model, every value checked or
        clamped for llama.cpp (workers.engine.llama.limits)."""
        try:
            sampling = resolve_sampling(job, config, self.model)
        except SamplingError as exc:
            raise InvalidRequest(str(exc), param=exc.param, code=exc.code) from exc
        return safe_sampling(sampling, n_vocab=self.model.n_vocab, n_ctx=self.n_ctx_per_slot)

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> None:
        """Raise unless the prompt (+ max_tokens) fits a slot, n slots exist and
        all n choices fit the KV cache together."""
        n_ctx, kv_cells = self.n_ctx_per_slot, self.model.kv_cells
        check_cells(
            prompt_tokens, max_tokens, n, n_ctx=n_ctx, n_slots=self.n_slots, kv_cells=kv_cells
        )

    @property
    def step_cost(self) -> StepCost | None:
        """What the pacing learnt a decode costs on this machine."""
        return self._times.cost()

    def metrics(self) -> WorkStats:
        """The engine's counters and gauges, for the worker's heartbeat."""
        queues = (self._waiting, self._incoming)
        kv_tokens = sum(len(t) for t in list(self._slots.tokens)) + self.cache.tokens
        return snapshot(self.stats, kv_tokens, self.model.kv_cells, self._active, queues)

    def submit(self, *requests: EngineRequest) -> None:
        """Queue requests; several given together join the same step."""
        for request in requests:
            check_request(
                request,
                n_ctx=self.n_ctx_per_slot,
                n_slots=self.n_slots,
                n_vocab=self.model.n_vocab,
                kv_cells=self.model.kv_cells,
            )
        with self._wake:
            if self._stopping:
                # The engine thread is gone or going: nobody else would end these.
                abandon(self.sink, list(requests), SHUTTING_DOWN, 503)
                return
            for request in requests:
                request.arrival = next(self._arrivals)
            self._incoming.extend(requests)
            if not all(is_bulk(r) for r in requests):
                self._interactive_arrived = True
                if self._abort.armed:
                    # A bulk-only step is decoding: it ends at its next graph
                    # node and the arrival's prompt goes into the next step.
                    self._abort.fire()
            self._wake.notify()

    def wait(
        self,
        request: EngineRequest,
        *,
        queue_timeout: float,
        prompt_token_s: float = PROMPT_TOKEN_BUDGET_S,
        token_s: float = TOKEN_BUDGET_S,
    ) -> Done | ErrorEvent:
        """The result of a submitted request, waited for within its time_budget
        (queue_timeout for a slot, then so long per prompt token and per token
        to generate). Past it the request is expired (a 504 error event);
        should the engine not end it even then, it is ended here: no caller
        ever waits forever."""
        return wait_bounded(
            self,
            request,
            queue_timeout=queue_timeout,
            prompt_token_s=prompt_token_s,
            token_s=token_s,
        )

    def cancel(self, request: EngineRequest) -> None:
        # Read by the engine thread at its next step.
        request.cancel()

    def expire(self, request: EngineRequest, reason: str) -> None:
        """End `request` at the next step with a 504 error event."""
        request.expired = reason
        request.cancel()
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        if not self._stop_thread():
            # Freeing the context under a running decode would crash: leak it,
            # but end every request, so that no waiter hangs on a dead engine.
            log.error("the engine thread did not stop within 30 s")
            pending = [*self._incoming, *self._waiting, *(s.request for s in self._active)]
            abandon(self.sink, pending, SHUTTING_DOWN, 503)
            return
        self._batch.free()
        self.model.close()

    # -- engine thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # Whatever ended the loop, every request still here gets its end.
            out: Out = []
            for seq in list(self._active):
                self._fail(seq.group, out, SHUTTING_DOWN, status=503)
            with self._wake:
                self._stopping = True
                pending = [*self._waiting, *self._incoming]
                self._waiting.clear()
                self._incoming.clear()
            for request in pending:
                self._finish(request, ErrorEvent(SHUTTING_DOWN, status=503), out)
            self._flush(out)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._incoming or self._active or self._waiting or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                self._interactive_arrived = False
            out: Out = []
            try:
                self._admit(out)
                if self._active:
                    self._step(out)
            except Exception as exc:
                # Failures of one request are caught where they happen (see
                # _isolated); this is the last resort, so the worker lives on.
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._fail(seq.group, out, f"inference failed: {exc}")
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
            request.done()
        self._finished.clear()

    def _admit(self, out: Out) -> None:
        for cancelled in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(cancelled)
            expired = cancelled.expired
            end = cancelled_answer(cancelled) if expired is None else error(expired, 504)
            self._finish(cancelled, end, out)
        self.stats.preempted += preempt_for_interactive(
            self._waiting, self._active, self._slots, self._give_back
        )
        while (request := next_request(self._waiting, self._slots, self._active)) is not None:
            self._waiting.remove(request)
            try:
                if not self._start(request):
                    # Its cells were not there after all (a cached prefix it
                    # counted on could not be shared): it waits in its place.
                    requeue(self._waiting, [request])
                    break
            except Exception as exc:
                log.exception("starting request %s failed", request.request_id)
                self._finish(request, ErrorEvent(f"the request could not start: {exc}"), out)

    def _start(self, request: EngineRequest) -> bool:
        seqs = start(request, self._slots, self.model)
        if seqs is None:
            return False
        self.stats.prompt_tokens_cached += seqs[0].group.tokens_cached
        request.admitted = True
        self._active.extend(seqs)
        return True

    def _step(self, out: Out) -> None:
        for seq in [s for s in self._active if s.request.cancelled]:
            if seq in self._active:
                with self._isolated(seq.group, out, "cancelling"):
                    self._cancel_group(seq.group, out)
        if not self._active:
            return
        self.stats.begin_step()
        started = time.perf_counter()
        step = plan(self._active, self.model.n_batch, self._bulk_share)
        n = 0
        completed: list[Sequence] = []
        for seq in self._active:
            seq.logits_index = -1
        # What each laid-out sequence was before, to undo an aborted step.
        undo: laid_out.LaidOut = []
        for seq in step.stepping:
            if seq not in self._active:
                continue  # its request failed while an earlier sibling was laid out
            with self._isolated(seq.group, out, "preparing the batch"):
                take = step.chunks.get(id(seq), 0)
                cached = self._slots.tokens[seq.slot]
                before = (seq, seq.n_evaluated, len(cached))
                added, prompt_done = self._batch.lay_out(seq, n, take, cached)
                if added:
                    undo.append(before)
                    n += added
                if prompt_done:
                    completed.append(seq)
        if n == 0:
            return
        rc = self._decode(n, laid_out.outputs(undo), step.bulk_only)
        if rc == 2:
            # Aborted for an interactive arrival: llama.cpp dropped the step's
            # cells; the sequences go back to where they were.
            self.stats.aborted += 1
            laid_out.undo(undo, self._slots.tokens)
            return
        in_batch = [seq for seq, _, _ in undo]
        if rc != 0:
            # The one failure that is the step's, not one request's: every
            # request with tokens in this batch fails (their caches are dropped).
            log.error("llama_decode returned %d for a batch of %d tokens", rc, n)
            for seq in in_batch:
                if seq in self._active:
                    self._fail(seq.group, out, f"inference failed: llama_decode returned {rc}")
            return
        laid_out.account(undo, self.stats, step=next(self._steps), started=started)
        self.stats.decoded(busy=len(self._active))
        for primary in completed:
            if primary in self._active:
                primary.group.prompt_done = time.perf_counter()
                with self._isolated(primary.group, out, "forking the choices"):
                    self._fork(primary)
        beams: dict[int, list[Sequence]] = {}
        for seq in list(self._active):
            if seq.group.beam is not None and seq.logits_index >= 0:
                beams.setdefault(id(seq.group), []).append(seq)
                continue
            if seq.logits_index >= 0 and seq in self._active:
                with self._isolated(seq.group, out, "sampling"):
                    token = seq.sampler.sample(self.model.ctx, seq.logits_index)
                    n_ctx, stats = self.n_ctx_per_slot, self.stats
                    end = take_token(self.model, seq, token, out, n_ctx=n_ctx, stats=stats)
                    if end is not None:
                        self._complete(seq, end, out)

        for group_seqs in beams.values():
            group = group_seqs[0].group
            if group_seqs[0] in self._active:
                with self._isolated(group, out, "beam search"):
                    self._advance_beams(sorted(group_seqs, key=lambda s: s.index), out)
        self.stats.end_step(n, len(in_batch))

    def _bulk_share(self, interactive: int) -> Share:
        return self._times.bulk_share(interactive, self.slowdown)

    def _decode(self, n: int, outputs: int, abortable: bool) -> int:
        """llama_decode of the laid-out batch, timed for the pacing model; a
        bulk-only step may be aborted by an interactive arrival (2)."""
        if abortable:
            with self._wake:
                if self._interactive_arrived:
                    return 2  # one is queued already: not worth starting
                self._abort.arm()
        started = time.perf_counter()
        try:
            rc = self._batch.decode(self.model.ctx, n)
        finally:
            if abortable:
                with self._wake:
                    self._abort.disarm()
        if rc == 0:
            self._times.record(n, outputs, time.perf_counter() - started)
        return rc

    def _advance_beams(self, seqs: list[Sequence], out: Out) -> None:
        group = seqs[0].group
        if group.first_token_at is None:
            group.first_token_at = time.perf_counter()
        results = beam.advance(self._beams, group, seqs)
        if results is None:
            return
        for seq in [s for s in self._active if s.group is group]:
            self._release(seq)
        beam.settle(group, results)
        self.stats.tokens_generated += group.n_generated
        self._finish(group.request, group.result(), out)
