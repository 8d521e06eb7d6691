"""The llama_batch an engine fills every step, and what goes into it.

Generating sequences get one token each, so every stream moves every step;
prompt chunks fill the rest of the batch (first come, first served,
interactive prompts before bulk ones), so a long prompt is spread over
several steps instead of stalling the streams already running. Bulk work
gets what interactive work leaves (workers.engine.llama.pacing): while an
interactive prompt is evaluated, bulk sequences sit the step out; while
interactive sequences generate, bulk gets the share that keeps their steps
within the allowed slowdown, the groups that stepped least recently first;
with no interactive work, it fills the batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from workers.engine.llama.pacing import UNBOUNDED, Share
from workers.engine.llama.sequence import Group, Sequence
from workers.engine.llama.slots import is_bulk


@dataclass
class Plan:
    stepping: list[Sequence] = field(default_factory=list)
    # Prompt tokens each prefilling sequence evaluates, by id(seq).
    chunks: dict[int, int] = field(default_factory=dict)
    # No interactive token in the step: an interactive arrival may abort it.
    bulk_only: bool = False


def plan(active: list[Sequence], n_batch: int, bulk_share: Callable[[int], Share]) -> Plan:
    """The sequences that step (see the module doc); `bulk_share(n)`: what
    bulk work may add to a step with n generating interactive sequences."""
    interactive = [s for s in active if not is_bulk(s.request)]
    out = Plan(stepping=[s for s in interactive if not s.waiting])
    budget = n_batch - sum(1 for s in out.stepping if s.generating)
    for seq in out.stepping:
        if budget > 0 and seq.prefilling:
            out.chunks[id(seq)] = take = min(budget, _left(seq))
            budget -= take
    if any(s.prefilling for s in interactive):
        return out
    out.bulk_only = not out.stepping
    share = UNBOUNDED if out.bulk_only else bulk_share(len(out.stepping))
    _add_bulk(out, active, budget, share)
    out.bulk_only = out.bulk_only and bool(out.stepping)
    return out


def _add_bulk(out: Plan, active: list[Sequence], tokens: int, share: Share) -> None:
    """Bulk groups into the step, the least recently stepped first (so a
    small share still moves every line), within `tokens` batch positions and
    the share's seconds; a group's sequences step together or not at all."""
    groups: dict[int, Group] = {}
    for seq in active:
        if is_bulk(seq.request):
            groups.setdefault(id(seq.group), seq.group)
    seconds = share.seconds
    for group in sorted(groups.values(), key=lambda g: g.last_step):
        if tokens <= 0:
            break
        seqs = [s for s in active if s.group is group and not s.waiting]
        decoding = sum(1 for s in seqs if s.generating)
        cost = decoding * share.per_output
        if decoding > tokens or cost > seconds:
            continue
        took = decoding
        for seq in seqs:
            if seq.prefilling:
                afford = share.prompt_tokens(seconds - cost)
                take = min(tokens - took, _left(seq), afford)
                if take <= 0:
                    continue
                out.chunks[id(seq)] = take
                took += take
                cost += take * share.per_input
        if took == 0:
            continue
        out.stepping.extend(seqs)
        tokens -= took
        seconds -= cost


def _left(seq: Sequence) -> int:
    return len(seq.request.prompt_tokens) - seq.n_evaluated


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
