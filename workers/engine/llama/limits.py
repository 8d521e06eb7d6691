"""What llama.cpp may be handed: every sampling value checked, or clamped the
way llama-server clamps it, before it crosses into C.

Through ctypes a C++ exception or a failed GGML_ASSERT aborts the whole
worker process, and ctypes silently truncates integers to their C type, so
nothing a request carries may reach llama.cpp unchecked. The worker checks
for itself: batch lines and jobs from other API versions reach it too."""

from __future__ import annotations

import dataclasses
import math

from workers.engine.interface import InvalidRequest
from workers.engine.llama.gbnf import nesting
from workers.engine.llama.slots import cells_needed
from workers.engine.types import EngineRequest, InvalidSlot, KvCacheExceeded, Sampling, check_fits

INT32_MAX = 2**31 - 1

# A grammar longer than this is refused: llama.cpp parses it on every
# request, and the JSON-schema grammars users send are far smaller.
MAX_GRAMMAR_CHARS = 256 * 1024
# llama.cpp's GBNF parser recurses once per nested group: a deep nesting
# overflows the C stack (a crash, not an error), so it is refused first.
MAX_GRAMMAR_NESTING = 64


class UnsafeValue(InvalidRequest):
    """A value llama.cpp cannot take (a 400 naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param)


_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "mirostat_tau",
    "mirostat_eta",
    "length_penalty",
)


def safe_sampling(sampling: Sampling, *, n_vocab: int, n_ctx: int) -> Sampling:
    """`sampling` with every value llama.cpp gets checked: non-finite numbers
    and impossible values raise UnsafeValue; counts beyond what the model
    has are clamped (top_k, min_keep and n_probs to the vocabulary,
    repeat_last_n to the context), as llama-server does."""
    for name in _FLOATS:
        value = getattr(sampling, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsafeValue(f"{name} must be a number", name)
        if not math.isfinite(value):
            raise UnsafeValue(f"{name} must be a finite number, not {value}", name)
    for token, bias in sampling.logit_bias:
        # -inf is the worker's own ban (a bias of false); NaN and +inf are not.
        if math.isnan(bias) or bias == math.inf:
            raise UnsafeValue(f"logit_bias of token {token} must be a finite number", "logit_bias")
        if not 0 <= token < n_vocab:
            raise UnsafeValue(
                f"logit_bias: token {token} is not in the vocabulary (0 to {n_vocab - 1})",
                "logit_bias",
            )
    if sampling.mirostat not in (0, 1, 2):
        raise UnsafeValue("mirostat must be 0, 1 or 2", "mirostat")
    if sampling.n < 1:
        raise UnsafeValue("n must be at least 1", "n")
    if sampling.repeat_last_n < -1:
        raise UnsafeValue("repeat_last_n must be -1 (the whole context) or more", "repeat_last_n")
    if sampling.grammar is not None:
        check_grammar_text(sampling.grammar)
    # -1 (and anything beyond the context) means the whole context: llama.cpp
    # allocates a ring buffer of this many tokens.
    last_n = n_ctx if sampling.repeat_last_n == -1 else min(sampling.repeat_last_n, n_ctx)
    return dataclasses.replace(
        sampling,
        top_k=max(0, min(sampling.top_k, n_vocab)),
        min_keep=max(0, min(sampling.min_keep, n_vocab)),
        repeat_last_n=last_n,
        logprobs=None if sampling.logprobs is None else max(0, min(sampling.logprobs, n_vocab)),
    )


def check_cells(
    prompt: int, max_tokens: int | None, n: int, *, n_ctx: int, n_slots: int, kv_cells: int
) -> None:
    """Raise unless a request of this shape fits a slot, n slots exist and all
    its choices fit the KV cache together."""
    check_fits(prompt, max_tokens, n, n_ctx=n_ctx, n_slots=n_slots)
    if (needed := cells_needed(prompt, max_tokens, n, n_ctx=n_ctx)) > kv_cells:
        raise KvCacheExceeded(needed, kv_cells)


def check_request(
    request: EngineRequest, *, n_ctx: int, n_slots: int, n_vocab: int, kv_cells: int
) -> None:
    """Raise unless `request` can be handed to the engine: it fits a slot and,
    with all its choices, the KV cache; its slot exists; and every prompt
    token is in the vocabulary."""
    sampling = request.sampling
    prompt = len(request.prompt_tokens)
    check_cells(
        prompt, sampling.max_tokens, sampling.n, n_ctx=n_ctx, n_slots=n_slots, kv_cells=kv_cells
    )
    if request.id_slot is not None and not 0 <= request.id_slot < n_slots:
        raise InvalidSlot(request.id_slot, n_slots)
    # llama_decode with a token outside the vocabulary fails the whole step:
    # such a prompt never gets that far.
    if not all(0 <= t < n_vocab for t in request.prompt_tokens):
        raise ValueError(f"the prompt holds token ids outside 0 to {n_vocab - 1}")


def check_grammar_text(grammar: str) -> None:
    """Refuse what llama.cpp's GBNF parser would crash on rather than reject:
    text that is not UTF-8, and groups nested deeper than its stack holds.
    Everything else goes to the parser, which reports errors cleanly."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise UnsafeValue(
            f"the grammar has {len(grammar)} characters; at most {MAX_GRAMMAR_CHARS} are accepted",
            "grammar",
        )
    try:
        grammar.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafeValue(f"the grammar is not valid Unicode: {exc.reason}", "grammar") from exc
    if "\x00" in grammar:
        raise UnsafeValue("the grammar contains a NUL character", "grammar")
    if nesting(grammar) > MAX_GRAMMAR_NESTING:
        raise UnsafeValue(
            f"the grammar nests groups deeper than {MAX_GRAMMAR_NESTING} levels", "grammar"
        )
