"""Which waiting request starts next, and which bulk requests give their
cells up. Interactive requests go first (first come, first served among
them), on slots of their own; a bulk request is admitted only when no
interactive request is waiting for the cache's cells. When interactive
requests wait for cells that bulk requests hold, the bulk requests that
generated least are preempted: their sequences end (what they evaluated
stays in the prefix cache) and they go back to their place in the queue
(ahead of every bulk request that came after them), to start again later
(recompute, as vLLM preempts, mostly from the cached prompt). So a running
batch costs an interactive request at most about the decode step in flight."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Sequence_

from workers.engine.llama.prefix_cache import BLOCK
from workers.engine.llama.sequence import Group, Sequence, shared_length, token_bytes
from workers.engine.llama.slots import Slots, is_bulk
from workers.engine.llama.starting import reuses_cache
from workers.engine.types import EngineRequest


def admission_order(waiting: Iterable[EngineRequest]) -> Iterator[EngineRequest]:
    """Interactive requests, then bulk ones, each in arrival order. Lazy (two
    passes, no sort): the queue may hold a long bulk backlog, and the first
    admissible request is usually near the front."""
    return itertools.chain(
        (r for r in waiting if not is_bulk(r)), (r for r in waiting if is_bulk(r))
    )


def next_request(
    waiting: deque[EngineRequest], slots: Slots, active: Sequence_[Sequence] = ()
) -> EngineRequest | None:
    """The next waiting request that can start now. A request short of
    sequence ids in its pool holds up the later ones of its pool only (one
    pinned to a busy slot, llama-server's id_slot, holds up nobody); one
    short of cells holds up everyone after it, so a bulk line never takes
    the cells an earlier request waits for. A request whose prompt starts
    with what an `active` sequence is evaluating waits for it (holding up
    nobody): the prefix then goes into the prefix cache and is shared."""
    blocked: set[bool] = set()
    evaluating = [s for s in active if s.prefilling and s.request.sampling.cache_prompt]
    for request in admission_order(waiting):
        pool = is_bulk(request)
        if pool in blocked:
            continue
        if evaluating and awaits_prefix(request, evaluating, slots):
            continue
        verdict = slots.verdict(request, reuse=reuses_cache(request))
        if verdict.ok:
            return request
        if not verdict.lacks_ids:
            return None
        if slots.pinned(request) is None:
            blocked.add(pool)
    return None


def awaits_prefix(request: EngineRequest, evaluating: list[Sequence], slots: Slots) -> bool:
    """Whether a sequence now evaluating its prompt will put at least a block
    more of `request`'s prompt in the prefix cache than it holds now. So
    requests that arrive together with one prefix (a batch's lines, one
    system prompt) evaluate it once. An interactive request waits only for
    interactive prompts: never behind a bulk prompt's chunks."""
    if not reuses_cache(request):
        return False
    prompt = request.prompt_tokens
    limit = len(prompt) - 1  # the last prompt token is evaluated: it yields the logits
    key: bytes | None = None
    cached: int | None = None
    for seq in evaluating:
        if is_bulk(seq.request) and not is_bulk(request):
            continue
        if key is None:
            key = token_bytes(prompt)
        shared = min(shared_length(token_bytes(seq.request.prompt_tokens), key), limit)
        if shared < BLOCK:
            continue
        if cached is None:
            cached = slots.cache.match(prompt, limit=limit)[1]
        if shared - cached >= BLOCK:
            return True
    return False


def preemptible(active: list[Sequence]) -> list[Group]:
    """Bulk groups that could give their cells back, least progress first.
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
    slots: Slots,
    release: Callable[[Group], None],
) -> int:
    """Free the cells the first waiting interactive request lacks from bulk
    groups; `release` ends a group (its sequences leave `active`, its cells
    are unreserved). A request that would not fit even then is not helped:
    preempting would only idle the cache. Preempted requests go back into
    `waiting` by arrival. Returns the number of groups preempted."""
    candidates = preemptible(active)
    if not candidates:
        return 0
    first = next((r for r in waiting if not is_bulk(r)), None)
    if first is None:
        return 0
    verdict = slots.verdict(first, reuse=reuses_cache(first))
    if verdict.ok or verdict.lacks_ids or verdict.cells > sum(g.reserved for g in candidates):
        return 0
    preempted: list[EngineRequest] = []
    short = verdict.cells
    for group in candidates:
        if short <= 0:
            break
        short -= group.reserved
        release(group)
        group.request.admitted = False
        preempted.append(group.request)
    requeue(waiting, preempted)
    return len(preempted)


def requeue(waiting: deque[EngineRequest], requests: list[EngineRequest]) -> None:
    """Put `requests` back into `waiting` at their places. `waiting` is in
    arrival order (requests are queued as they arrive): sorted() merges."""
    queue = sorted([*waiting, *requests], key=lambda r: r.arrival)
    waiting.clear()
    waiting.extend(queue)
