"""A request admitted to slots: its group and one sequence per choice, each
with its own sampler, the cached prefix its first sequence shares, and the
cells it reserves. Either all of them are made or none stays behind."""

from __future__ import annotations

from workers.engine.llama.beam import BeamState
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.prefix_cache import Entry
from workers.engine.llama.sampling import build_sampler, choice_seed
from workers.engine.llama.sequence import Group, Sequence
from workers.engine.llama.slots import Slots, reservation
from workers.engine.llama.text import TextAssembler
from workers.engine.types import EngineRequest


def start(request: EngineRequest, slots: Slots, model: LlamaModel) -> list[Sequence] | None:
    """The sequences of `request`, on slots taken from `slots` (the first one
    sharing the longest cached prefix); None when its cells cannot be
    reserved after all. On failure every slot and pin is given back."""
    sampling = request.sampling
    n_ctx = model.n_ctx_per_slot
    group = Group(request)
    if sampling.beam:
        group.beam = BeamState(
            width=sampling.n,
            length_penalty=sampling.length_penalty,
            early_stopping=sampling.early_stopping,
            max_tokens=sampling.max_tokens or (n_ctx - len(request.prompt_tokens)),
        )
    reuse = reuses_cache(request)
    taken: list[int] = []
    seqs: list[Sequence] = []
    entry = None
    try:
        taken.append(slots.take(request))
        entry = slots.share_prefix(request, taken[0], reuse)
        reused = len(slots.tokens[taken[0]])
        cells = reservation(request, n_ctx=n_ctx, shared=reused)
        if not slots.reserve(cells, keep=entry):
            _give_back(slots, taken, entry, seqs)
            return None
        group.reserved = cells
        if entry is not None:
            group.pins.append(entry)
        primary = _sequence(group, 0, taken[0], model)
        primary.n_evaluated = reused
        seqs.append(primary)
        for index in range(1, sampling.n):
            taken.append(slots.take(request))
            sibling = _sequence(group, index, taken[-1], model)
            sibling.fork_of = primary
            seqs.append(sibling)
    except BaseException:
        slots.unreserve(group.reserved)
        _give_back(slots, taken, entry, seqs)
        raise
    group.tokens_cached = reused
    return seqs


def reuses_cache(request: EngineRequest) -> bool:
    """Whether the request starts from a cached prefix. A seeded request
    evaluates its whole prompt: logits computed from a reused prefix (other
    chunks) differ in the last bits, and a seeded draw must not depend on
    what the cache happens to hold."""
    return request.sampling.cache_prompt and request.sampling.seed is None


def _give_back(slots: Slots, taken: list[int], entry: Entry | None, seqs: list[Sequence]) -> None:
    for seq in seqs:
        seq.sampler.free()
    for slot in taken:
        slots.release(slot)
    if entry is not None:
        slots.cache.unpin(entry)


def _sequence(group: Group, index: int, slot: int, model: LlamaModel) -> Sequence:
    sampling = group.request.sampling
    prompt = group.request.prompt_tokens
    sampler = build_sampler(
        sampling,
        vocab=model.vocab,
        n_vocab=model.n_vocab,
        seed=choice_seed(sampling.seed, index),
        history=prompt,
        eog=model.eog_tokens() if sampling.ignore_eos else [],
    )
    max_tokens = sampling.max_tokens
    return Sequence(
        group=group,
        index=index,
        slot=slot,
        sampler=sampler,
        max_tokens=max_tokens if max_tokens is not None else model.n_ctx_per_slot - len(prompt),
        text=TextAssembler(sampling.stop),
    )
