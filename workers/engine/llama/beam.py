"""Beam search over parallel sequences.

A beam request holds `width` slots for its whole life. Every step each live
beam proposes its 2 x width most likely next tokens; the best `width`
continuations survive. A surviving continuation keeps its parent's slot when
it is the parent's first child, else takes the slot of a beam that left no
child, into which the parent's KV cache is copied (llama.cpp copies the
stream inside the next decode, before that decode writes anything)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.events import ChoiceResult
from workers.engine.llama.sampling import logprobs_at

if TYPE_CHECKING:
    from workers.engine.llama.model import LlamaModel
    from workers.engine.llama.sequence import Group, Sequence


@dataclass(frozen=True)
class BeamHost:
    """What beam search needs of the engine running it."""

    model: LlamaModel
    n_ctx_per_slot: int
    # Copy one slot's KV cache (and the engine's record of its tokens) into
    # another: (source slot, target slot).
    copy_slot: Callable[[int, int], None]
    # A beam the search no longer continues frees its slot.
    drop_beam: Callable[[Sequence], None]


@dataclass(frozen=True, slots=True)
class Hypothesis:
    tokens: list[int]
    cumulative: float
    reason: str

    def score(self, length_penalty: float) -> float:
        return length_score(self.cumulative, len(self.tokens), length_penalty)


# exp() of more than this overflows a float.
_MAX_EXP = 700.0


def length_score(cumulative: float, length: int, length_penalty: float) -> float:
    """cumulative / length ** length_penalty (Hugging Face's beam score),
    computed in log space: a large penalty saturates instead of raising
    OverflowError (which would fail the step)."""
    exponent = length_penalty * math.log(max(length, 1))
    scale = math.exp(-max(-_MAX_EXP, min(_MAX_EXP, exponent)))
    return float(cumulative * scale)


@dataclass
class BeamState:
    width: int
    length_penalty: float
    early_stopping: bool | str
    max_tokens: int
    cumulative: dict[int, float] = field(default_factory=dict)  # id(seq) -> score
    tokens: dict[int, list[int]] = field(default_factory=dict)  # id(seq) -> tokens
    finished: list[Hypothesis] = field(default_factory=list)
    started: bool = False


def _text(host: BeamHost, tokens: list[int]) -> str:
    return b"".join(host.model.piece(t) for t in tokens).decode("utf-8", errors="replace")


def _stopped_at(text: str, stops: tuple[str, ...]) -> int:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else -1


def advance(host: BeamHost, group: Group, seqs: list[Sequence]) -> list[ChoiceResult] | None:
    """One beam step after a decode. Returns the final choices when the
    search is over, else None (each live seq then holds its next token)."""
    state: BeamState = group.beam
    sampling = group.request.sampling
    width = state.width
    n_vocab = host.model.n_vocab
    # At the first step every beam holds the same prompt: expand one.
    parents = seqs if state.started else seqs[:1]
    candidates: list[tuple[float, Sequence, int]] = []
    for seq in parents:
        base = state.cumulative.get(id(seq), 0.0)
        top = logprobs_at(host.model.ctx, seq.logits_index, n_vocab, 0, 2 * width).top
        candidates.extend((base + lp, seq, token) for token, lp in top)
    candidates.sort(key=lambda c: c[0], reverse=True)
    chosen: list[tuple[float, Sequence, int]] = []
    for cumulative, parent, token in candidates:
        history = state.tokens.get(id(parent), [])
        if host.model.is_eog(token) and not sampling.ignore_eos:
            state.finished.append(Hypothesis(history, cumulative, "stop"))
            continue
        new = [*history, token]
        if sampling.stop and _stopped_at(_text(host, new), sampling.stop) >= 0:
            state.finished.append(Hypothesis(new, cumulative, "stop"))
            continue
        chosen.append((cumulative, parent, token))
        # No more continuations than live beams (some may have been dropped).
        if len(chosen) == len(seqs):
            break
    state.started = True
    step_len = len(state.tokens.get(id(parents[0]), [])) + 1
    prompt_len = len(group.request.prompt_tokens)
    out_of_room = step_len >= state.max_tokens or prompt_len + step_len >= host.n_ctx_per_slot
    if out_of_room or not chosen:
        for cumulative, parent, token in chosen:
            tokens = [*state.tokens.get(id(parent), []), token]
            state.finished.append(Hypothesis(tokens, cumulative, "length"))
        return _results(host, state, sampling.stop)
    if _done(state, chosen, step_len):
        return _results(host, state, sampling.stop)
    _reassign(host, state, seqs, chosen)
    return None


def _done(state: BeamState, chosen: list[tuple[float, Any, int]], length: int) -> bool:
    if len(state.finished) < state.width or state.early_stopping == "never":
        return False
    if state.early_stopping is True:
        return True
    # The best live beam can no longer beat the worst kept hypothesis.
    kept = sorted((h.score(state.length_penalty) for h in state.finished), reverse=True)
    best_live = length_score(chosen[0][0], length, state.length_penalty)
    return bool(best_live < kept[state.width - 1])


def _reassign(
    host: BeamHost,
    state: BeamState,
    seqs: list[Sequence],
    chosen: list[tuple[float, Sequence, int]],
) -> None:
    children: dict[int, int] = {}
    for _, parent, _ in chosen:
        children[id(parent)] = children.get(id(parent), 0) + 1
    spare = [s for s in seqs if id(s) not in children]
    claimed: set[int] = set()
    plan: list[tuple[Sequence, float, list[int]]] = []
    for cumulative, parent, token in chosen:
        tokens = [*state.tokens.get(id(parent), []), token]
        if id(parent) not in claimed:
            claimed.add(id(parent))
            plan.append((parent, cumulative, tokens))
            continue
        target = spare.pop()
        host.copy_slot(parent.slot, target.slot)
        plan.append((target, cumulative, tokens))
    # Beams left without a continuation (the others ended as hypotheses)
    # give their slots back rather than decode nothing.
    for seq in spare:
        host.drop_beam(seq)
    state.cumulative.clear()
    state.tokens.clear()
    for seq, cumulative, tokens in plan:
        state.cumulative[id(seq)] = cumulative
        state.tokens[id(seq)] = tokens
        seq.last_token = tokens[-1]
        seq.n_generated = len(tokens)


def _results(host: BeamHost, state: BeamState, stops: tuple[str, ...]) -> list[ChoiceResult]:
    ranked = sorted(state.finished, key=lambda h: h.score(state.length_penalty), reverse=True)
    results = []
    for index, hypothesis in enumerate(ranked[: state.width]):
        text = _text(host, hypothesis.tokens)
        at = _stopped_at(text, stops)
        if at >= 0:
            text = text[:at]
        results.append(
            ChoiceResult(
                index=index,
                finish_reason=hypothesis.reason,
                text=text,
                cumulative_logprob=hypothesis.cumulative,
                n_tokens=len(hypothesis.tokens),
            )
        )
    return results


def settle(group: Group, results: list[ChoiceResult]) -> None:
    """Record the final choices of a finished search on its group."""
    group.n_generated = sum(r.n_tokens or 0 for r in results)
    for result in results:
        group.choices[result.index] = result
    # Fewer hypotheses than beams can come back (all ended at once).
    for index in range(len(results), group.n):
        group.choices[index] = ChoiceResult(index=index, finish_reason="stop", text="")
