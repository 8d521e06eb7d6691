"""Which waiting request gets slots next, and which bulk requests give theirs
up. Interactive requests go first (first come, first served among them); a
bulk request is admitted only when no interactive request is waiting. When
an interactive request waits for slots that bulk requests hold, the bulk
requests that generated least are preempted: their slots are freed and they
go back to the head of the bulk queue, to start again from scratch later
(recompute, as vLLM preempts; their prompt often still sits in a slot's
cache). So a running batch costs an interactive request at most about the
decode step in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from workers.engine.sequence import Group, Sequence, next_admissible
from workers.engine.types import INTERACTIVE, EngineRequest


def admission_order(waiting: deque[EngineRequest]) -> list[EngineRequest]:
    # sorted() is stable: arrival order holds within a priority.
    return sorted(waiting, key=lambda r: r.priority)


def next_request(waiting: deque[EngineRequest], free_slots: list[int]) -> EngineRequest | None:
    return next_admissible(admission_order(waiting), free_slots)


def preemptible(active: list[Sequence]) -> list[Group]:
    """Bulk groups that could give their slots back, least progress first.
    Only unpublished requests: nothing of theirs has reached a client."""
    groups: dict[int, Group] = {}
    for seq in active:
        request = seq.request
        if request.priority > INTERACTIVE and not request.publish:
            groups.setdefault(id(seq.group), seq.group)
    return sorted(groups.values(), key=lambda g: g.n_generated)


def preempt_for_interactive(
    waiting: deque[EngineRequest],
    active: list[Sequence],
    free_slots: int,
    release: Callable[[Group], int],
) -> int:
    """Free slots for the first waiting interactive request (unless it is
    pinned to a slot); `release` frees a group's slots and returns how many.
    Returns the number of groups preempted."""
    first = next((r for r in waiting if r.priority == INTERACTIVE), None)
    if first is None or first.id_slot is not None or free_slots >= first.sampling.n:
        return 0
    preempted: list[EngineRequest] = []
    for group in preemptible(active):
        if free_slots >= first.sampling.n:
            break
        free_slots += release(group)
        group.request.admitted = False
        preempted.append(group.request)
    # Back at the head, in their original order, ahead of later bulk requests.
    waiting.extendleft(reversed(preempted))
    return len(preempted)
