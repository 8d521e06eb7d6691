"""The slots of one llama.cpp context: which are free, and which tokens each
one's KV cache holds (for prompt prefix reuse)."""

from __future__ import annotations

import llama_cpp

from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sequence import common_prefix

# A cached prefix shorter than this is not worth taking a slot out of order.
MIN_REUSE = 16


class Slots:
    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.free = list(range(model.n_slots))
        self.tokens: list[list[int]] = [[] for _ in range(model.n_slots)]

    def take_lowest(self) -> int:
        """The lowest free slot, emptied."""
        self.free.sort()
        slot = self.free.pop(0)
        self.clear(slot)
        return slot

    def copy(self, source: int, target: int) -> None:
        """`target` received a copy of `source`'s KV cache."""
        self.tokens[target] = list(self.tokens[source])

    def release(self, slot: int, *, keep_cache: bool) -> None:
        if not keep_cache:
            self.clear(slot)
        self.free.append(slot)

    def pick(
        self, prompt: list[int], cache_prompt: bool, pinned: int | None = None
    ) -> tuple[int, int]:
        """The free slot caching the longest prefix of `prompt` (when that is
        worth it), else the lowest free slot, or the `pinned` one (llama-server's
        id_slot); and how many tokens it reuses."""
        # Low slots first: a compact set of busy slots decodes in fewer
        # micro-batches (see LlamaEngine._step).
        self.free.sort()
        best, best_len = self.free[0] if pinned is None else pinned, 0
        if cache_prompt and pinned is not None:
            best_len = common_prefix(self.tokens[pinned], prompt)
        elif cache_prompt:
            for slot in self.free:
                shared = common_prefix(self.tokens[slot], prompt)
                if shared > best_len:
                    best, best_len = slot, shared
            if best_len < MIN_REUSE and best != self.free[0]:
                best = self.free[0]
                best_len = common_prefix(self.tokens[best], prompt)
        self.free.remove(best)
        # At least the last prompt token is evaluated again: it yields the logits.
        reuse = min(best_len, len(prompt) - 1)
        if reuse <= 0 or not self._truncate(best, reuse):
            self.clear(best)
            return best, 0
        return best, reuse

    def _truncate(self, slot: int, keep: int) -> bool:
        mem = self.model.memory
        if not llama_cpp.llama_memory_seq_rm(mem, slot, keep, -1):
            return False
        # Sliding-window layers drop old cells: the prefix is only reusable when
        # the window before `keep` is still there (as llama-server checks).
        n_swa = self.model.n_swa
        if n_swa > 0 and llama_cpp.llama_memory_seq_pos_min(mem, slot) > max(0, keep - n_swa):
            return False
        del self.tokens[slot][keep:]
        return True

    def clear(self, slot: int) -> None:
        self.model.clear_slot(slot)
        self.tokens[slot].clear()
