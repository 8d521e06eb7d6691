"""Prompt prefixes evaluated once, shared by every sequence that starts with them.

In llama.cpp's unified KV cache a cell belongs to a set of sequence ids, so
`llama_memory_seq_cp` shares cells instead of copying them. The cache keeps
recently evaluated prompts (and what was generated after them) on holder
sequence ids of their own: a new request whose prompt starts with one of
them takes those cells at no cost and evaluates only the rest, whichever
request or batch line evaluated them first.

A prompt shares the longest prefix any entry holds, to the token: a unified
cache's cells can be shared at any length, so nothing is gained by rounding
to blocks, and a repeated prompt reuses all but its last token, as with
llama-server's slot cache. BLOCK is the least gain worth waiting for
(workers.engine.llama.admission). The cache is bounded by the
tokens its entries hold and by its holder ids; it gives up its least
recently used entries first, whenever running requests need the cells. An
entry a running sequence took cells from is pinned until that sequence
ends: its cells are counted once, here, and the request reserved only what
it evaluates itself (workers.engine.llama.slots)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import llama_cpp

from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sequence import shared_length, token_bytes

# Tokens of prefix worth a wait for another request's prompt evaluation.
BLOCK = 16


@dataclass(eq=False)
class Entry:
    holder: int  # the sequence id whose cells these are
    tokens: list[int]
    key: bytes = b""  # token_bytes(tokens), for matching
    used: int = 0  # the cache's clock at the last hit or insertion
    pins: int = 0  # running sequences that took cells from it
    hits: int = field(default=0)
    # The first position whose sliding-window cells the holder has (0 for a
    # model without sliding-window layers); it holds every one from there on.
    window_from: int = 0


class PrefixCache:
    def __init__(self, model: LlamaModel, holders: list[int], budget: int) -> None:
        self.model = model
        self.budget = budget
        self._free = list(holders)
        self._entries: list[Entry] = []
        self._clock = itertools.count(1)
        self.evicted = 0

    @property
    def tokens(self) -> int:
        """Cells the cache accounts for (an entry's shared prefix with another
        entry counts twice: a bound, never an undercount)."""
        return sum(len(e.tokens) for e in list(self._entries))

    @property
    def entries(self) -> int:
        return len(self._entries)

    def evictable(self) -> int:
        """Cells that evicting every unpinned entry would give back."""
        return sum(len(e.tokens) for e in self._entries if e.pins == 0)

    # -- lookup -----------------------------------------------------------

    def match(self, prompt: list[int], *, limit: int) -> tuple[Entry | None, int]:
        """The entry holding the longest prefix of `prompt` (at most `limit`
        tokens), and that length; nothing is shared yet."""
        best: Entry | None = None
        best_len = 0
        key = token_bytes(prompt)
        for entry in self._entries:
            shared = min(shared_length(entry.key, key), limit)
            if shared > best_len and self._usable(entry, shared):
                best, best_len = entry, shared
        return best, best_len

    def _usable(self, entry: Entry, n: int) -> bool:
        """Whether a sequence continuing after the entry's first `n` tokens
        would find the sliding window before it: the window layers attend to
        the last n_swa positions, which the holder must have."""
        n_swa = self.model.n_swa
        return n_swa <= 0 or entry.window_from <= max(0, n - n_swa)

    def share(self, entry: Entry, n: int, target: int) -> bool:
        """Give the empty sequence `target` the entry's first `n` cells and pin
        the entry; False (and `target` left empty) when they are not usable."""
        mem = self.model.memory
        llama_cpp.llama_memory_seq_cp(mem, entry.holder, target, 0, n)
        # Sliding-window layers keep only the last n_swa positions: the
        # prefix is usable only when the window before its end is there (the
        # guard llama-server applies to a slot's own cache).
        n_swa = self.model.n_swa
        if n_swa > 0:
            # pos_min/max read the sliding-window cache: nothing copied (-1),
            # a window that starts too late or ends short means unusable.
            low = llama_cpp.llama_memory_seq_pos_min(mem, target)
            high = llama_cpp.llama_memory_seq_pos_max(mem, target)
            if low < 0 or low > max(0, n - n_swa) or high != n - 1:
                llama_cpp.llama_memory_seq_rm(mem, target, -1, -1)
                # llama.cpp may have reused the holder's oldest window cells
                # (masked for it) since the entry was made: match() must not
                # offer these lengths again.
                held = int(llama_cpp.llama_memory_seq_pos_min(mem, entry.holder))
                entry.window_from = max(entry.window_from, held)
                return False
        entry.pins += 1
        entry.hits += 1
        entry.used = next(self._clock)
        return True

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1

    # -- insertion and eviction -------------------------------------------

    def insert(self, source: int, tokens: list[int]) -> tuple[Entry | None, int]:
        """Keep `tokens`, which the running sequence
        `source` holds, as an entry, pinned for the caller. The cells exist
        already: the cache only takes over accounting for them. Returns the
        entry and how many of `source`'s cells it now accounts for (the
        caller's reservation shrinks by as many); (None, 0) when nothing was
        kept. An entry that `tokens` extends grows in place; one that already
        holds them is pinned as it is."""
        n = len(tokens)
        if n == 0:
            return None, 0
        mem = self.model.memory
        key = token_bytes(tokens[:n])
        # Sliding-window layers: the source may have dropped the window cells
        # of its first positions; it holds every one from `window_from` on.
        window_from = self._window_from(source)
        for entry in self._entries:
            shared = shared_length(entry.key, key)
            if shared >= n:
                entry.used = next(self._clock)
                entry.pins += 1
                return entry, 0
            # Growing in place keeps the holder's window cells contiguous only
            # when the source still has them from the entry's end on.
            if shared == len(entry.tokens) and window_from <= shared:
                grow = n - shared
                if not self._make_room(grow, keep=entry):
                    return None, 0
                llama_cpp.llama_memory_seq_cp(mem, source, entry.holder, shared, n)
                entry.tokens, entry.key = tokens[:n], key
                entry.used = next(self._clock)
                entry.pins += 1
                return entry, grow
        if not self._make_room(n, need_holder=True):
            return None, 0
        holder = self._free.pop()
        llama_cpp.llama_memory_seq_cp(mem, source, holder, 0, n)
        entry = Entry(
            holder, tokens[:n], key, used=next(self._clock), pins=1, window_from=window_from
        )
        self._entries.append(entry)
        return entry, n

    def _window_from(self, seq_id: int) -> int:
        if self.model.n_swa <= 0:
            return 0
        return max(0, int(llama_cpp.llama_memory_seq_pos_min(self.model.memory, seq_id)))

    def evict(self, cells: int, *, keep: Entry | None = None) -> int:
        """Give back at least `cells` cells from unpinned entries (never
        `keep`), least recently used first, fewer when there are not enough.
        Returns the cells given back."""
        freed = 0
        for entry in sorted(self._entries, key=lambda e: e.used):
            if freed >= cells:
                break
            if entry.pins == 0 and entry is not keep:
                freed += len(entry.tokens)
                self._drop(entry)
        return freed

    def clear(self) -> None:
        """Drop every unpinned entry."""
        self.evict(self.tokens)

    def _make_room(self, n: int, *, keep: Entry | None = None, need_holder: bool = False) -> bool:
        """Evict until `n` more cells fit the budget, and a holder id is free
        when `need_holder`."""
        if n > self.budget:
            return False
        self.evict(self.tokens + n - self.budget, keep=keep)
        if need_holder and not self._free:
            self.evict(1, keep=keep)
        return self.tokens + n <= self.budget and (bool(self._free) or not need_holder)

    def _drop(self, entry: Entry) -> None:
        llama_cpp.llama_memory_seq_rm(self.model.memory, entry.holder, -1, -1)
        self._entries.remove(entry)
        self._free.append(entry.holder)
        self.evicted += 1
