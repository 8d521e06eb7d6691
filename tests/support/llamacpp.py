"""llama.cpp's low-level API, as the tests of the tiny models drive it: a
quiet backend, a model loaded with one context, and tokenization."""

from __future__ import annotations

import contextlib
import ctypes
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import llama_cpp
import pytest

__all__ = ["Loaded", "load", "quiet_backend", "tokenize"]


def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Swallow llama.cpp log output so test output stays readable."""


# llama.cpp keeps only the raw function pointer: the ctypes callback object
# must stay referenced for the life of the process or the pointer dangles.
_LOG_CALLBACK = llama_cpp.llama_log_callback(_drop_log)


def quiet_backend() -> None:
    """Silence llama.cpp's log and initialise its backend (once a process
    is enough; again is harmless)."""
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


@dataclass
class Loaded:
    path: pathlib.Path
    model: llama_cpp.llama_model_p
    ctx: llama_cpp.llama_context_p
    vocab: llama_cpp.llama_vocab_p


@contextlib.contextmanager
def load(path: pathlib.Path, **context: int | bool) -> Iterator[Loaded]:
    """The model at `path` on the CPU with one context, two threads and the
    other context parameters in `context` (n_ctx, n_batch, embeddings, ...)."""
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    assert model, f"llama.cpp failed to load {path.name}"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_threads = 2
    cparams.n_threads_batch = 2
    for name, value in context.items():
        setattr(cparams, name, value)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        pytest.fail("llama.cpp failed to create a context")
    vocab = llama_cpp.llama_model_get_vocab(model)
    assert vocab is not None
    try:
        yield Loaded(path, model, ctx, vocab)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def tokenize(
    vocab: llama_cpp.llama_vocab_p,
    text: str,
    *,
    add_special: bool = True,
    parse_special: bool = True,
) -> list[int]:
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    assert n >= 0, f"tokenize failed ({n})"
    return list(buf[:n])
