"""Per-sequence sampler chains and log-probabilities, on llama.cpp's samplers.

The chain follows llama-server's order: logit bias, grammar, penalties, then
top_k, typical, top_p, min_p, temperature and the draw (or mirostat). A
request may give its own order (llama-server's `samplers`)."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from workers.engine.llama_model import LlamaModel
from workers.engine.types import Sampling


class GrammarError(ValueError):
    """The grammar does not parse (a 400)."""


def _add(chain: Any, sampler: Any) -> None:
    llama_cpp.llama_sampler_chain_add(chain, sampler)


def grammar_sampler(vocab: Any, grammar: str) -> Any:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise GrammarError("the grammar could not be parsed (GBNF, with a `root` rule)")
    return sampler


def check_grammar(vocab: Any, grammar: str) -> None:
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, grammar))


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
    for name in sampling.samplers or ():
        if name == "penalties":
            penalties = _penalties(sampling, n_vocab, history)
            if penalties is not None:
                _add(chain, penalties)
        elif name == "top_k" and sampling.top_k > 0:
            _add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        elif name == "typ_p" and sampling.typical_p < 1.0:
            _add(chain, llama_cpp.llama_sampler_init_typical(sampling.typical_p, min_keep))
        elif name == "top_p" and sampling.top_p < 1.0:
            _add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, min_keep))
        elif name == "min_p" and sampling.min_p > 0.0:
            _add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, min_keep))
        elif name == "temperature":
            _add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        elif name == "infill":
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
    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    logits = np.ctypeslib.as_array(
        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
    )
    peak = float(logits.max())
    log_z = peak + math.log(float(np.exp(logits - peak).sum()))
    top: list[tuple[int, float]] = []
    if top_n > 0:
        best = np.argpartition(-logits, top_n)[:top_n]
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
