"""Which waiting request gets slots next, and which bulk requests give theirs
up. Interactive requests go first (first come, first served among them); a
bulk request is admitted only when no interactive request is waiting for
slots. When interactive requests wait for slots that bulk requests hold, the
bulk requests that generated least are preempted: their slots are freed and
they go back to their place in the queue (ahead of every bulk request that
came after them), to start again from scratch later (recompute, as vLLM
preempts; their prompt often still sits in a slot's cache). So a running
batch costs an interactive request at most about the decode step in flight."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from workers.engine.llama.sequence import Group, Sequence, next_admissible
from workers.engine.types import INTERACTIVE, EngineRequest


def is_bulk(request: EngineRequest) -> bool:
    return request.priority > INTERACTIVE


def admission_order(waiting: Iterable[EngineRequest]) -> Iterator[EngineRequest]:
    """Interactive requests, then bulk ones, each in arrival order. Lazy (two
    passes, no sort): the queue may hold a long bulk backlog, and the first
    admissible request is usually near the front."""
    return itertools.chain(
        (r for r in waiting if not is_bulk(r)), (r for r in waiting if is_bulk(r))
    )


def next_request(waiting: deque[EngineRequest], free_slots: list[int]) -> EngineRequest | None:
    return next_admissible(admission_order(waiting), free_slots)


def preemptible(active: list[Sequence]) -> list[Group]:
    """Bulk groups that could give their slots back, least progress first.
    A streamed, published request is left alone: its tokens already reached a
    client, and a restart would send them again."""
    groups: dict[int, Group] = {}
    for seq in active:
        request = seq.request
        if is_bulk(request) and not request.streams:
            groups.setdefault(id(seq.group), seq.group)
    return sorted(groups.values(), key=lambda g: g.n_generated)


def preempt_for_interactive(
    waiting: deque[EngineRequest],
    active: list[Sequence],
    free_slots: int,
    release: Callable[[Group], int],
) -> int:
    """Free the slots the waiting interactive requests need, in their order,
    from bulk groups; `release` frees a group's slots (dropping its sequences
    from `active`) and returns how many. A request that would not fit even
    then is not helped (it waits for interactive work to end, and so do those
    behind it): preempting would only idle the slots. One pinned to a slot
    (llama-server's id_slot) gets that slot back from a bulk group holding it.
    Preempted requests go back into `waiting` by arrival. Returns the number
    of groups preempted."""
    candidates = preemptible(active)
    if not candidates:
        return 0
    holder = {seq.slot: seq.group for seq in active}
    size = {id(g): sum(1 for s in active if s.group is g) for g in candidates}
    preempted: list[EngineRequest] = []

    def preempt(group: Group) -> int:
        candidates.remove(group)
        for slot in [slot for slot, g in holder.items() if g is group]:
            del holder[slot]
        freed = release(group)
        group.request.admitted = False
        preempted.append(group.request)
        return freed

    free = free_slots
    claimed: set[int] = set()
    for request in (r for r in waiting if not is_bulk(r)):
        if request.id_slot is not None:
            slot = request.id_slot
            group = holder.get(slot)
            if group is not None and group in candidates:
                free += preempt(group)
                group = None
            # While its slot is busy with interactive work, next_admissible
            # skips it and admits those behind it: it claims nothing.
            if group is None and slot not in claimed and free >= request.sampling.n:
                claimed.add(slot)
                free -= request.sampling.n
            continue
        need = request.sampling.n
        if free < need <= free + sum(size[id(g)] for g in candidates):
            while free < need:
                free += preempt(candidates[0])
        if free < need:
            break
        free -= need
    if preempted:
        # `waiting` is in arrival order (requests are queued as they arrive);
        # sorted() merges the preempted back into their places.
        queue = sorted([*waiting, *preempted], key=lambda r: r.arrival)
        waiting.clear()
        waiting.extend(queue)
    return len(preempted)
