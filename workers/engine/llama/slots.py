"""The sequences of one unified llama.cpp KV cache and the cells they may use.

Sequence ids come from two pools: `parallel` slots for interactive requests
(llama-server's slots, which `id_slot` names) and `bulk_parallel` for batch
lines, so a running batch never holds a slot an interactive user waits for.
Every sequence may grow to the model's context size; what bounds them
together is the cache's cells. A request is admitted only when the cells it
may need (its prompt, less what it shares from the prefix cache, plus
max_tokens for each choice) are free, so a running request never runs out
of cells and is never truncated: what cannot fit waits, and what could never
fit is refused at submission."""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.llama.model import LlamaModel
from workers.engine.llama.prefix_cache import Entry, PrefixCache
from workers.engine.types import INTERACTIVE, EngineRequest


def cells_needed(
    prompt: int, max_tokens: int | None, n: int, *, n_ctx: int, shared: int = 0
) -> int:
    """Cells a request may need beyond the `shared` prompt prefix: its prompt's
    other tokens, and max_tokens (else up to the context) for each choice."""
    limit = max_tokens if max_tokens is not None else n_ctx - prompt
    return prompt - shared + max(n, 1) * max(limit, 1)


def reservation(request: EngineRequest, *, n_ctx: int, shared: int = 0) -> int:
    sampling = request.sampling
    prompt = len(request.prompt_tokens)
    return cells_needed(prompt, sampling.max_tokens, sampling.n, n_ctx=n_ctx, shared=shared)


def is_bulk(request: EngineRequest) -> bool:
    return request.priority > INTERACTIVE


@dataclass
class Verdict:
    """Whether a waiting request can start now, and if not, what it lacks."""

    ok: bool
    lacks_ids: bool = False
    cells: int = 0  # cells it needs beyond what is free or evictable


class Slots:
    def __init__(self, model: LlamaModel, cache: PrefixCache) -> None:
        self.model = model
        self.cache = cache
        n_int, n_bulk = model.n_slots, model.n_bulk
        self.free = list(range(n_int))
        self.free_bulk = list(range(n_int, n_int + n_bulk))
        # The tokens whose cells each running sequence holds.
        self.tokens: list[list[int]] = [[] for _ in range(n_int + n_bulk)]
        self.kv_cells = model.kv_cells
        self.reserved = 0

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx_per_slot

    def free_cells(self) -> int:
        return self.kv_cells - self.reserved - self.cache.tokens

    def _pool(self, request: EngineRequest) -> list[int]:
        return self.free_bulk if is_bulk(request) else self.free

    def pinned(self, request: EngineRequest) -> int | None:
        """The slot `request` must run on: llama-server's id_slot names an
        interactive slot; a bulk line runs wherever bulk work does."""
        return None if is_bulk(request) else request.id_slot

    def verdict(self, request: EngineRequest, *, reuse: bool) -> Verdict:
        """Whether `request` could start now (evicting cached prefixes as
        needed), without changing anything."""
        pool = self._pool(request)
        pinned = self.pinned(request)
        n = request.sampling.n
        if len(pool) < n or (pinned is not None and pinned not in pool):
            return Verdict(ok=False, lacks_ids=True)
        entry, shared = self._match(request, reuse)
        need = reservation(request, n_ctx=self.n_ctx, shared=shared)
        keep = len(entry.tokens) if entry is not None and entry.pins == 0 else 0
        available = self.free_cells() + self.cache.evictable() - keep
        if need > available:
            return Verdict(ok=False, cells=need - available)
        return Verdict(ok=True)

    def _match(self, request: EngineRequest, reuse: bool) -> tuple[Entry | None, int]:
        if not reuse:
            return None, 0
        prompt = request.prompt_tokens
        # At least the last prompt token is evaluated: it yields the logits.
        return self.cache.match(prompt, limit=len(prompt) - 1)

    def take(self, request: EngineRequest) -> int:
        """A free sequence id from the request's pool (its pinned slot, or
        the lowest: a compact set of busy ids keeps the cache compact)."""
        pool = self._pool(request)
        pinned = self.pinned(request)
        pool.sort()
        seq_id = pool.pop(0) if pinned is None else pool.pop(pool.index(pinned))
        self.clear(seq_id)
        return seq_id

    def share_prefix(self, request: EngineRequest, seq_id: int, reuse: bool) -> Entry | None:
        """Give sequence `seq_id` (empty) the longest cached prefix of the
        request's prompt; the entry used (pinned), or None."""
        entry, shared = self._match(request, reuse)
        if entry is None or not self.cache.share(entry, shared, seq_id):
            return None
        self.tokens[seq_id] = list(request.prompt_tokens[:shared])
        return entry

    def reserve(self, cells: int, keep: Entry | None = None) -> bool:
        """Reserve `cells`, evicting cached prefixes (never `keep`) to make room."""
        short = cells - self.free_cells()
        if short > 0:
            self.cache.evict(short, keep=keep)
        if cells > self.free_cells():
            return False
        self.reserved += cells
        return True

    def unreserve(self, cells: int) -> None:
        self.reserved -= cells

    def copy(self, source: int, target: int) -> None:
        """`target` received a copy of `source`'s KV cache."""
        self.tokens[target] = list(self.tokens[source])

    def release(self, seq_id: int) -> None:
        """Empty sequence `seq_id` and give it back to its pool (what it held
        that is worth keeping went to the prefix cache first)."""
        self.clear(seq_id)
        (self.free if seq_id < self.model.n_slots else self.free_bulk).append(seq_id)

    def clear(self, seq_id: int) -> None:
        self.model.clear_slot(seq_id)
        self.tokens[seq_id].clear()
