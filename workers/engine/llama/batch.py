"""The llama_batch an engine fills every step, and what goes into it.

Generating sequences get one token each, so every stream moves every step;
prompt chunks fill the rest of the batch (first come, first served,
interactive prompts before bulk ones), so a long prompt is spread over
several steps instead of stalling the streams already running, and a bulk
prompt never delays an interactive first token. While an interactive prompt
is evaluated, bulk sequences sit the step out: the step is then that prompt
(and the interactive streams) only, so a running batch delays a first token
by about the step already under way, not by two full steps. Bulk work loses
one step per arriving interactive request."""

from __future__ import annotations

import llama_cpp
import numpy as np

from workers.engine.llama.sequence import Sequence
from workers.engine.types import INTERACTIVE


def _priority_of(seq: Sequence) -> int:
    return seq.request.priority


def plan(active: list[Sequence], n_batch: int) -> tuple[list[Sequence], dict[int, int]]:
    """The sequences that step (see the module doc), and the prompt tokens
    each prefilling one evaluates, by id(seq)."""
    hold = any(s.prefilling and s.request.priority == INTERACTIVE for s in active)
    stepping = [s for s in active if not (hold and s.request.priority > INTERACTIVE)]
    budget = n_batch - sum(1 for s in stepping if s.generating)
    chunks: dict[int, int] = {}
    for seq in sorted(stepping, key=_priority_of):
        if budget > 0 and seq.prefilling:
            take = min(budget, len(seq.request.prompt_tokens) - seq.n_evaluated)
            chunks[id(seq)] = take
            budget -= take
    return stepping, chunks


class Batch:
    """One llama_batch, reused every step, with numpy views of its arrays."""

    def __init__(self, n_batch: int) -> None:
        self.raw = llama_cpp.llama_batch_init(n_batch, 0, 1)
        raw = self.raw
        self._tokens = np.ctypeslib.as_array(raw.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(raw.pos, shape=(n_batch,))
        self._logits = np.ctypeslib.as_array(raw.logits, shape=(n_batch,))
        np.ctypeslib.as_array(raw.n_seq_id, shape=(n_batch,))[:] = 1

    def lay_out(self, seq: Sequence, n: int, take: int, cached: list[int]) -> tuple[int, bool]:
        """Put seq's next token, or its next prompt chunk of `take` tokens, at
        position n; `cached` (the tokens its slot holds) grows by what went
        in. Returns how many tokens went in, and whether that chunk ends the
        prompt (its logits are then the first token's)."""
        raw = self.raw
        if seq.generating:
            self._tokens[n] = seq.last_token
            self._pos[n] = seq.position
            raw.seq_id[n][0] = seq.slot
            self._logits[n] = 1
            cached.append(seq.last_token)
            seq.logits_index = n
            return 1, False
        if take == 0:
            return 0, False
        prompt = seq.request.prompt_tokens
        start = seq.n_evaluated
        self._tokens[n : n + take] = prompt[start : start + take]
        self._pos[n : n + take] = np.arange(start, start + take, dtype=np.int32)
        self._logits[n : n + take] = 0
        for i in range(n, n + take):
            raw.seq_id[i][0] = seq.slot
        cached.extend(prompt[start : start + take])
        seq.n_evaluated += take
        if not seq.prefilling:
            self._logits[n + take - 1] = 1
            seq.logits_index = n + take - 1
            return take, True
        return take, False

    def decode(self, ctx: object, n_tokens: int) -> int:
        self.raw.n_tokens = n_tokens
        return int(llama_cpp.llama_decode(ctx, self.raw))

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.raw)
