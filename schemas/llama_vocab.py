"""llama.cpp tokenization shared by the API (/tokenize, /detokenize) and the
workers, so that both turn text into exactly the same tokens."""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

log = logging.getLogger("inferq.llama")

_lock = threading.Lock()
_ready = False

# What llama.cpp logs as errors when a decode is aborted through its abort
# callback (GGML_STATUS_ABORTED = 1, llama_decode's 2): the engine aborts
# batch steps for interactive arrivals on purpose and counts them itself.
_ABORTED = (
    "failed with error 1",
    "failed to compute graph, compute status: 1",
    "failed to decode, ret = 2",
)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
    # llama.cpp prints to stderr unless a callback takes its logs; keep them
    # at debug except errors (GGML_LOG_LEVEL_ERROR = 4).
    if not text:
        return
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        error = level == 4 and not message.endswith(_ABORTED)
        log.log(logging.WARNING if error else logging.DEBUG, "%s", message)


def init_backend() -> None:
    """Route llama.cpp's logs to `logging` and initialise its backend, once."""
    global _ready
    with _lock:
        if not _ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _ready = True


class ModelLoadError(RuntimeError):
    """llama.cpp could not read a model file."""


def load_model(path: Path, *, gpu_layers: int | None = None, vocab_only: bool = False) -> Any:
    """The llama_model of `path` (the backend initialised first), which the
    caller frees with llama_model_free. `vocab_only`: the vocabulary alone, no
    weights (the API's /tokenize); `gpu_layers` -1 offloads every layer, as
    llama.cpp's -ngl 999; None keeps llama.cpp's default."""
    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    if gpu_layers is not None:
        params.n_gpu_layers = 999 if gpu_layers < 0 else gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path}")
    return model


def tokenize(vocab: Any, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    capacity = len(data) + 8
    while True:
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n >= 0:
            return list(buf[:n])
        capacity = -n


def token_piece(vocab: Any, token: int, *, special: bool) -> bytes:
    """The bytes of one token (special tokens written out when `special`)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[: max(n, 0)]


Tokenizer = Callable[..., list[int]]


def tokenize_mixed(
    tokenize_text: Tokenizer, parts: Sequence[int | str], *, add_special: bool, parse_special: bool
) -> list[int]:
    """llama-server's tokenize_mixed: strings are tokenized, ids kept as they
    are; special tokens (BOS) are added only when the first part is a string."""
    tokens: list[int] = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            first = add_special and i == 0
            tokens.extend(tokenize_text(part, add_special=first, parse_special=parse_special))
        else:
            tokens.append(part)
    return tokens
