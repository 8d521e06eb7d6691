"""A request admitted to slots: its group and one sequence per choice, each
with its own sampler. Either all of them are made or none stays behind."""

from __future__ import annotations

from workers.engine.llama.beam import BeamState
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sampling import build_sampler, choice_seed
from workers.engine.llama.sequence import Group, Sequence
from workers.engine.llama.slots import Slots
from workers.engine.llama.text import TextAssembler
from workers.engine.types import EngineRequest


def start(request: EngineRequest, slots: Slots, model: LlamaModel) -> list[Sequence]:
    """The sequences of `request`, on slots taken from `slots` (the first one
    reusing the longest cached prefix); on failure every slot is given back."""
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
    # A seeded request evaluates its whole prompt: logits computed from a
    # reused prefix (other chunks) differ in the last bits, and a seeded
    # draw must not depend on what the cache happens to hold.
    reuse = sampling.cache_prompt and sampling.seed is None
    taken: list[int] = []
    seqs: list[Sequence] = []
    try:
        primary_slot, reused = slots.pick(request.prompt_tokens, reuse, request.id_slot)
        taken.append(primary_slot)
        primary = _sequence(group, 0, primary_slot, model)
        primary.n_evaluated = reused
        seqs.append(primary)
        for index in range(1, sampling.n):
            taken.append(slots.take_lowest())
            sibling = _sequence(group, index, taken[-1], model)
            sibling.fork_of = primary
            seqs.append(sibling)
    except BaseException:
        for seq in seqs:
            seq.sampler.free()
        for slot in taken:
            slots.release(slot, keep_cache=False)
        raise
    group.tokens_cached = reused
    return seqs


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
