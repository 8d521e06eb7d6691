"""Sampling one sequence without ever handing llama.cpp's grammar a token it
rejects.

`llama_sampler_sample` on a chain with a grammar applies the grammar, draws,
then makes the grammar accept the draw. When nothing the grammar allows is
left (the grammar is complete but ignore_eos bans the end, or a logit_bias
bans every token it allows), the draw is a token the grammar rejects, and
accepting it throws a C++ exception that aborts the process. So a sequence
with a grammar samples in steps the worker controls:

1. the chain draws as if there were no grammar, and the grammar checks just
   that token (cheap: llama.cpp's grammar costs grows with the candidates it
   is given, 0.1 s over a 262k vocabulary for JSON, minutes for some
   grammars); a token it allows is taken, as llama-server does;
2. otherwise the grammar masks a copy of all the logits, the worker looks at
   what is left (nothing: the sequence ends), and the chain draws again
   among what the grammar allows.

A grammar whose full mask takes too long would hold every sequence of the
engine: it is refused before it runs (estimate_mask_seconds) and, should a
mask still take longer than MAX_MASK_S, its request fails."""

from __future__ import annotations

import ctypes
import math
import time
from typing import Any

import llama_cpp
import numpy as np

# llama_token_data {int32 id; float logit; float p;}: 12 bytes, no padding.
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
# The longest one full grammar mask may take during generation; every
# sequence of the engine waits for it.
MAX_MASK_S = 5.0
# Candidates timed to estimate a full mask before a grammar is accepted, in
# growing probes: a grammar whose cost explodes is refused after the small
# probe instead of spending minutes on the large one.
_PROBES = (8, 64, 1024)


class GrammarTooSlow(RuntimeError):
    """A grammar that takes too long to evaluate over the vocabulary."""


def _array(cur: np.ndarray) -> Any:
    data = ctypes.cast(cur.ctypes.data, llama_cpp.llama_token_data_p)
    return llama_cpp.llama_token_data_array(data, len(cur), -1, False)


def estimate_mask_seconds(grammar: Any, n_vocab: int, *, limit: float = math.inf) -> float:
    """About how long `grammar` (a fresh grammar sampler) takes to mask the
    whole vocabulary in its start state, timed over samples of the tokens;
    stops probing as soon as the estimate passes `limit`."""
    estimate = 0.0
    for size in _PROBES:
        ids = np.unique(np.linspace(0, n_vocab - 1, num=min(size, n_vocab)).astype(np.int32))
        cur = np.zeros(len(ids), dtype=TOKEN_DATA)
        cur["id"] = ids
        array = _array(cur)
        started = time.perf_counter()
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        estimate = (time.perf_counter() - started) * n_vocab / len(ids)
        if estimate > limit or len(ids) >= n_vocab:
            break
    return estimate


def logits_view(ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    if not pointer:
        raise RuntimeError(f"llama.cpp has no logits at batch position {index}")
    return np.ctypeslib.as_array(
        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
    )


class SequenceSampler:
    """A sequence's sampler chain; with a grammar, the grammar kept apart (see
    the module doc). `sample` returns None when no token can follow (the
    sequence then ends as if the model had stopped)."""

    def __init__(
        self,
        chain: Any,
        *,
        grammar: Any = None,
        n_vocab: int = 0,
        bias: tuple[tuple[int, float], ...] = (),
        eog: list[int] | None = None,
    ) -> None:
        self.chain = chain
        self.grammar = grammar
        self._n_vocab = n_vocab
        self._eog = np.asarray(eog or [], dtype=np.int64)
        self._bias_ids = np.asarray([t for t, _ in bias], dtype=np.int64)
        self._bias_values = np.asarray([b for _, b in bias], dtype=np.float32)
        if grammar is not None:
            self._cur = np.zeros(n_vocab, dtype=TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._array = _array(self._cur)
            self._one = np.zeros(1, dtype=TOKEN_DATA)
            self._one_array = _array(self._one)

    def sample(self, ctx: Any, index: int) -> int | None:
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, index))
        logits = logits_view(ctx, index, self._n_vocab)
        token = self._draw(self._fill(logits, ban_eog=True))
        if token is None or not self._allows(token):
            token = self._constrained(logits)
            if token is None:
                return None
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def _fill(self, logits: np.ndarray, *, ban_eog: bool) -> np.ndarray:
        """The candidates array reset to every token, biased; returns its logits."""
        cur, array = self._cur, self._array
        cur["id"] = self._ids
        logit = cur["logit"]
        logit[:] = logits
        cur["p"] = 0.0
        if self._bias_ids.size:
            # As llama.cpp's logit-bias sampler: entries add up, -inf bans.
            np.add.at(logit, self._bias_ids, self._bias_values)
        if ban_eog and self._eog.size:
            logit[self._eog] = -np.inf
        array.size, array.selected, array.sorted = self._n_vocab, -1, False
        return logit

    def _draw(self, logit: np.ndarray) -> int | None:
        """The chain's draw from the candidates array, if it is a real token."""
        if not np.any(logit > -np.inf):
            return None
        array = self._array
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        selected = int(array.selected)
        if not 0 <= selected < int(array.size):
            return None
        token = int(self._cur["id"][selected])
        return token if 0 <= token < self._n_vocab else None

    def _allows(self, token: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, 0.0, 0.0
        array = self._one_array
        array.size, array.selected, array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(one["logit"][0] > -np.inf)

    def _constrained(self, logits: np.ndarray) -> int | None:
        """Draw among the tokens the grammar allows; None when there are none."""
        logit = self._fill(logits, ban_eog=False)
        started = time.perf_counter()
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._array))
        took = time.perf_counter() - started
        if took > MAX_MASK_S:
            raise GrammarTooSlow(
                f"the grammar took {took:.1f} s to evaluate one token (at most "
                f"{MAX_MASK_S:.0f} s): simplify it"
            )
        if self._eog.size:
            # ignore_eos: the end is banned while the grammar allows anything
            # else; once the grammar is complete, the end is all that is left.
            others = logit.copy()
            others[self._eog] = -np.inf
            if np.any(others > -np.inf):
                logit[self._eog] = -np.inf
        allowed = logit > -np.inf  # NaN compares False: never allowed either
        if not allowed.any():
            return None
        token = self._draw(logit)
        if token is None or not allowed[token]:
            # The draw fell outside the mask (NaN logits from extreme
            # settings): take the likeliest allowed token instead.
            token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        return token

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None
