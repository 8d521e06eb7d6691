"""How sequences leave the engine: a choice completes, a request is cancelled,
fails or is preempted; and what they leave behind in the prefix cache.

A request's cells stay reserved, and the cache entries it shares cells with
stay pinned, until its last sequence has ended (its siblings share its
prompt's cells). What a finished sequence evaluated goes to the prefix
cache on the way out, so the next request with the same start reuses it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import llama_cpp

from schemas.events import Done, ErrorEvent, encode
from workers.engine.lifecycle import cancelled_answer, error
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sequence import Group, Sequence
from workers.engine.llama.slots import Slots
from workers.engine.llama.stats import EngineStats
from workers.engine.llama.tokens import End, Out, close_choice
from workers.engine.types import EngineRequest

log = logging.getLogger("inferq.engine")


class Endings:
    """The engine's book-keeping of ending sequences (mixed into LlamaEngine;
    engine thread only)."""

    model: LlamaModel
    stats: EngineStats
    _active: list[Sequence]
    _slots: Slots
    _finished: list[EngineRequest]

    @contextlib.contextmanager
    def _isolated(self, group: Group, out: Out, what: str) -> Iterator[None]:
        """An exception while working on one request fails that request (a 500
        error event), not the step, the other requests or the worker."""
        try:
            yield
        except Exception as exc:
            log.exception("%s failed for request %s", what, group.request.request_id)
            self._fail(group, out, f"inference failed while {what}: {exc}")

    def _keep(self, seq: Sequence) -> None:
        """Put what `seq` holds in the prefix cache; the cells the cache now
        accounts for leave its request's reservation."""
        group = seq.group
        entry, accounted = self._slots.cache.insert(seq.slot, self._slots.tokens[seq.slot])
        if entry is None:
            return
        group.pins.append(entry)
        accounted = min(accounted, group.reserved)
        group.reserved -= accounted
        self._slots.unreserve(accounted)

    def _fork(self, primary: Sequence) -> None:
        """The prompt is evaluated: it goes to the prefix cache, and the
        request's other choices share its cells and sample from the same
        logits. Beams are copied by the beam step itself, into just the slots
        that need one."""
        if primary.request.sampling.cache_prompt:
            self._keep(primary)
        for seq in self._active:
            if seq.fork_of is primary:
                if primary.group.beam is None:
                    self._copy_slot(primary.slot, seq.slot)
                seq.fork_of = None
                seq.n_evaluated = primary.n_evaluated
                seq.logits_index = primary.logits_index

    def _copy_slot(self, source: int, target: int) -> None:
        """`target` holds exactly `source`'s cells from now on (shared: in a
        unified cache this copies no data)."""
        mem = self.model.memory
        llama_cpp.llama_memory_seq_rm(mem, target, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, source, target, -1, -1)
        self._slots.copy(source, target)

    def _drop_beam(self, seq: Sequence) -> None:
        self._release(seq, keep_cache=False)

    def _give_back(self, group: Group) -> None:
        """Preemption: end a bulk group's sequences, keeping what they evaluated."""
        for seq in [s for s in self._active if s.group is group]:
            self._release(seq)

    def _complete(self, seq: Sequence, end: End, out: Out) -> None:
        close_choice(seq, end, out)
        self._release(seq)
        if seq.group.complete:
            self._finish(seq.request, seq.group.result(), out)

    def _cancel_group(self, group: Group, out: Out) -> None:
        if group.request.expired is not None:
            self._fail(group, out, group.request.expired, status=504)
            return
        for seq in [s for s in self._active if s.group is group]:
            self._release(seq)
        self._finish(group.request, cancelled_answer(group.request, group.result()), out)

    def _fail(self, group: Group, out: Out, message: str, status: int = 500) -> None:
        for seq in [s for s in self._active if s.group is group]:
            try:
                self._release(seq, keep_cache=False)
            except Exception:
                log.exception("releasing a slot of %s failed", group.request.request_id)
        self._finish(group.request, error(message, status), out)

    def _release(self, seq: Sequence, *, keep_cache: bool = True) -> None:
        self._active.remove(seq)
        group = seq.group
        try:
            seq.sampler.free()
            keep = keep_cache and seq.request.sampling.cache_prompt and not seq.waiting
            if keep and group.beam is None:
                self._keep(seq)
        finally:
            self._slots.release(seq.slot)
            if not any(s.group is group for s in self._active):
                self._end_group(group)

    def _end_group(self, group: Group) -> None:
        """The group's last sequence ended: its cells and pins go back."""
        self._slots.unreserve(group.reserved)
        group.reserved = 0
        for entry in group.pins:
            self._slots.cache.unpin(entry)
        group.pins.clear()

    def _finish(self, request: EngineRequest, result: Done | ErrorEvent, out: Out) -> None:
        if not request.settle(result):
            return
        request.admitted = False  # its slots are released by now
        if request.publish:
            out.append((request.request_id, encode(result)))
        self._finished.append(request)
