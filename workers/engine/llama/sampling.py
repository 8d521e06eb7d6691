"""Per-sequence sampler chains and log-probabilities, on llama.cpp's samplers.

The chain follows llama-server's order: logit bias, grammar, penalties, then
top_k, typical, top_p, min_p, temperature and the draw (or mirostat). A
request may give its own order (llama-server's `samplers`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from workers.engine.llama.constrained import SequenceSampler, estimate_mask_seconds, logits_view
from workers.engine.llama.gbnf import why_unparsable
from workers.engine.llama.model import LlamaModel
from workers.engine.types import Sampling

# The most candidates llama.cpp's infill sampler is given (see _add_in_order).
INFILL_CANDIDATES = 256
# A grammar whose full mask is estimated to take longer is refused: every
# sequence of the engine would wait for it (JSON takes about 0.1 s over a
# 262k vocabulary; the worker mostly checks single tokens instead).
MAX_ESTIMATED_MASK_S = 2.0


class GrammarError(ValueError):
    """The grammar does not parse (a 400)."""


def _add(chain: Any, sampler: Any) -> None:
    llama_cpp.llama_sampler_chain_add(chain, sampler)


def grammar_sampler(vocab: Any, grammar: str) -> Any:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise GrammarError(f"the grammar could not be parsed (GBNF): {why_unparsable(grammar)}")
    return sampler


def check_grammar(vocab: Any, grammar: str, n_vocab: int | None = None) -> None:
    """Raise GrammarError unless `grammar` parses and, given the vocabulary
    size, can be evaluated over it in reasonable time (see constrained.py)."""
    sampler = grammar_sampler(vocab, grammar)
    try:
        if n_vocab:
            seconds = estimate_mask_seconds(sampler, n_vocab, limit=MAX_ESTIMATED_MASK_S)
            if seconds > MAX_ESTIMATED_MASK_S:
                raise GrammarError(
                    f"the grammar is too complex: evaluating it over this model's {n_vocab} "
                    f"tokens would take about {seconds:.1f} s per token (at most "
                    f"{MAX_ESTIMATED_MASK_S:.0f} s); simplify it"
                )
    finally:
        llama_cpp.llama_sampler_free(sampler)


def build_sampler(
    sampling: Sampling,
    *,
    vocab: Any,
    n_vocab: int,
    seed: int,
    history: list[int],
    eog: list[int],
) -> SequenceSampler:
    """The sampler of one sequence. Without a grammar, one llama.cpp chain
    (ignore_eos bans the `eog` tokens in it); with one, the grammar and the
    logit bias stay out of the chain, so that a dead end is seen before
    llama.cpp's grammar would throw (workers.engine.llama.constrained)."""
    if not sampling.grammar:
        banned = eog if sampling.ignore_eos else []
        chain = build_chain(
            sampling, vocab=vocab, n_vocab=n_vocab, seed=seed, history=history, banned=banned
        )
        return SequenceSampler(chain)
    rest = dataclasses.replace(sampling, grammar=None, logit_bias=())
    grammar = grammar_sampler(vocab, sampling.grammar)
    try:
        chain = build_chain(
            rest, vocab=vocab, n_vocab=n_vocab, seed=seed, history=history, banned=[]
        )
    except BaseException:
        llama_cpp.llama_sampler_free(grammar)
        raise
    return SequenceSampler(
        chain,
        grammar=grammar,
        n_vocab=n_vocab,
        bias=sampling.logit_bias,
        eog=eog if sampling.ignore_eos else None,
    )


def build_chain(
    sampling: Sampling,
    *,
    vocab: Any,
    n_vocab: int,
    seed: int,
    history: list[int],
    banned: list[int],
) -> Any:
    """A sampler chain for one sequence; `history` primes the penalties (the
    prompt counts, as in llama-server); `banned` tokens never come out."""
    chain: Any = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    biases = list(sampling.logit_bias) + [(t, -math.inf) for t in banned]
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))()
        for i, (token, bias) in enumerate(biases):
            array[i] = llama_cpp.llama_logit_bias(token, bias)
        _add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array))
    if sampling.grammar:
        _add(chain, grammar_sampler(vocab, sampling.grammar))
    if sampling.samplers is not None and not sampling.mirostat:
        _add_in_order(chain, sampling, vocab=vocab, n_vocab=n_vocab, history=history)
        _add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain
    penalties = _penalties(sampling, n_vocab, history)
    if penalties is not None:
        _add(chain, penalties)
    min_keep = max(sampling.min_keep, 1)
    if sampling.temperature <= 0.0:
        _add(chain, llama_cpp.llama_sampler_init_greedy())
    elif sampling.mirostat == 1:
        _add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        _add(
            chain,
            llama_cpp.llama_sampler_init_mirostat(
                n_vocab, seed, sampling.mirostat_tau, sampling.mirostat_eta, 100
            ),
        )
    elif sampling.mirostat == 2:
        _add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        _add(
            chain,
            llama_cpp.llama_sampler_init_mirostat_v2(
                seed, sampling.mirostat_tau, sampling.mirostat_eta
            ),
        )
    else:
        if sampling.top_k > 0:
            _add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.typical_p < 1.0:
            _add(chain, llama_cpp.llama_sampler_init_typical(sampling.typical_p, min_keep))
        if sampling.top_p < 1.0:
            _add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, min_keep))
        if sampling.min_p > 0.0:
            _add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, min_keep))
        _add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        _add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def _penalties(sampling: Sampling, n_vocab: int, history: list[int]) -> Any:
    if (
        sampling.repeat_penalty == 1.0
        and sampling.presence_penalty == 0.0
        and sampling.frequency_penalty == 0.0
    ):
        return None
    # The worker's safe_sampling (workers.engine.llama.limits) resolves -1 to the
    # context size; n_vocab only bounds a Sampling built without it.
    last_n = n_vocab if sampling.repeat_last_n < 0 else sampling.repeat_last_n
    penalties = llama_cpp.llama_sampler_init_penalties(
        n_vocab,
        last_n,
        sampling.repeat_penalty,
        sampling.frequency_penalty,
        sampling.presence_penalty,
    )
    for token in history[-last_n:] if last_n > 0 else []:
        llama_cpp.llama_sampler_accept(penalties, token)
    return penalties


def _add_in_order(
    chain: Any, sampling: Sampling, *, vocab: Any, n_vocab: int, history: list[int]
) -> None:
    """llama-server's `samplers`: exactly these, in this order (a sampler left
    out is not used, one named twice applies twice). Temperature 0 keeps only
    the likeliest token, as llama.cpp's temperature sampler does. dry, xtc,
    top_n_sigma, adaptive_p and tfs_z are skipped: inferq has no parameters
    for them, and at llama-server's defaults they do nothing."""
    min_keep = max(sampling.min_keep, 1)
    # The candidates left so far, as far as top_k bounds them.
    bound = n_vocab
    for name in sampling.samplers or ():
        if name == "penalties":
            penalties = _penalties(sampling, n_vocab, history)
            if penalties is not None:
                _add(chain, penalties)
        elif name == "top_k" and sampling.top_k > 0:
            _add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            bound = min(bound, sampling.top_k)
        elif name == "typ_p" and sampling.typical_p < 1.0:
            _add(chain, llama_cpp.llama_sampler_init_typical(sampling.typical_p, min_keep))
        elif name == "top_p" and sampling.top_p < 1.0:
            _add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, min_keep))
        elif name == "min_p" and sampling.min_p > 0.0:
            _add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, min_keep))
        elif name == "temperature":
            _add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        elif name == "infill":
            # llama.cpp's infill sampler compares every candidate with every
            # other: over a whole vocabulary (262k tokens) one draw takes
            # hours and wedges the engine. It sees at most the likeliest
            # INFILL_CANDIDATES (llama-server runs it after top_k too).
            if bound > INFILL_CANDIDATES:
                _add(chain, llama_cpp.llama_sampler_init_top_k(INFILL_CANDIDATES))
                bound = INFILL_CANDIDATES
            _add(chain, llama_cpp.llama_sampler_init_infill(vocab))


def choice_seed(seed: int | None, index: int) -> int:
    """Choice i of a seeded request draws with seed + i, so n > 1 choices differ
    but the request as a whole is reproducible."""
    if seed is None:
        return int(llama_cpp.LLAMA_DEFAULT_SEED)
    return (seed + index) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


def logprobs_at(ctx: Any, index: int, n_vocab: int, token: int, top_n: int) -> TokenLogprob:
    """Log-probability of `token` and the top_n alternatives under the model's
    raw distribution at batch position `index` (before sampling filters)."""
    logits = logits_view(ctx, index, n_vocab)
    peak = float(logits.max())
    log_z = peak + math.log(float(np.exp(logits - peak).sum()))
    top: list[tuple[int, float]] = []
    # More alternatives than the vocabulary holds is all of it (llama-server
    # clamps n_probs the same way); argpartition needs kth < n_vocab.
    top_n = min(top_n, n_vocab)
    if 0 < top_n < n_vocab:
        best = np.argpartition(-logits, top_n)[:top_n]
    elif top_n > 0:
        best = np.arange(n_vocab)
    if top_n > 0:
        best = best[np.argsort(-logits[best])]
        top = [(int(t), float(logits[t]) - log_z) for t in best]
    return TokenLogprob(token, float(logits[token]) - log_z, top)


def logprob_entry(model: LlamaModel, index: int, token: int, n_top: int) -> dict[str, Any]:
    """A chosen token's log-probability entry, as the workers publish it:
    {"id", "token", "bytes", "logprob", "top_logprobs": [...]}."""
    lp = logprobs_at(model.ctx, index, model.n_vocab, token, n_top)

    def info(t: int) -> dict[str, Any]:
        piece = model.piece(t)
        return {"id": t, "token": piece.decode("utf-8", "replace"), "bytes": list(piece)}

    return {
        **info(token),
        "logprob": lp.logprob,
        "top_logprobs": [{**info(t), "logprob": v} for t, v in lp.top],
    }
