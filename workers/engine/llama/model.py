"""A llama.cpp model and context through llama-cpp-python's low-level API.

The high-level `Llama` class runs one sequence and reserves n_batch x n_vocab
floats of scores; inferq needs many sequences in one context, so it talks to
the C API directly."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from schemas.llama_vocab import load_model, token_piece, tokenize
from schemas.registry import BULK_PARALLEL, PREFIX_ENTRIES

log = logging.getLogger("inferq.llama")


def new_context(model: Any, cparams: Any, *, threads: int, failure: str) -> Any:
    """A llama_context on `model` computing on `threads` threads; when llama.cpp
    cannot make one the model is freed and RuntimeError(failure) raised."""
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise RuntimeError(failure)
    return ctx


@dataclass(frozen=True)
class ContextOptions:
    """`n_slots` interactive and `n_bulk` bulk sequences, each up to
    `n_ctx_per_slot` tokens, sharing one unified KV cache of `kv_cells` cells
    (default: n_slots x n_ctx_per_slot, the memory of one full context per
    slot); `n_holders` more sequence ids hold the prefix cache's entries."""

    n_slots: int
    n_ctx_per_slot: int
    n_bulk: int = BULK_PARALLEL
    kv_cells: int | None = None
    n_holders: int = PREFIX_ENTRIES
    n_batch: int = 512
    n_threads: int | None = None
    gpu_layers: int = 0
    f16_kv: bool = True


class LlamaModel:
    """Owns the llama_model and one llama_context whose unified KV cache all
    its sequences share."""

    def __init__(self, path: Path, options: ContextOptions) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        model = load_model(path, gpu_layers=options.gpu_layers)
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        threads = options.n_threads or os.cpu_count() or 1
        cparams = llama_cpp.llama_context_default_params()
        # A unified cache: a cell belongs to a set of sequences, so prefixes
        # are shared without copies, and a sequence may use any free cell
        # instead of n_ctx / n_seq_max of its own (workers.engine.llama.slots
        # keeps them within the cells).
        kv_cells = options.kv_cells or options.n_ctx_per_slot * options.n_slots
        if kv_cells < options.n_ctx_per_slot:
            raise ValueError(
                f"a KV cache of {kv_cells} cells cannot hold one context of "
                f"{options.n_ctx_per_slot} tokens"
            )
        cparams.n_ctx = kv_cells
        cparams.n_seq_max = options.n_slots + options.n_bulk + options.n_holders
        cparams.kv_unified = True
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        # llama.cpp keeps a logits row per sequence id at least, and asserts
        # (aborting the process) when there are more ids than output rows;
        # a step never has more outputs than its n_batch tokens anyway.
        cparams.n_outputs_max = max(options.n_batch, cparams.n_seq_max)
        if not options.f16_kv:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
        failure = f"llama.cpp could not create a context for {path}"
        ctx = new_context(model, cparams, threads=threads, failure=failure)
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_slots = options.n_slots
        self.n_bulk = options.n_bulk
        self.n_holders = options.n_holders
        self.n_batch = options.n_batch
        self.kv_cells = int(llama_cpp.llama_n_ctx(ctx))
        self.n_ctx_per_slot = options.n_ctx_per_slot
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.n_swa = int(llama_cpp.llama_model_n_swa(model))
        self._eog: list[int] | None = None
        self._pieces: dict[int, bytes] = {}

    # -- vocabulary -------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        return tokenize(self.vocab, text, add_special=add_special, parse_special=parse_special)

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (special tokens render empty)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = token_piece(self.vocab, token, special=False)
        return cached

    def special_text(self, token: int) -> str:
        return token_piece(self.vocab, token, special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token (banned for ignore_eos); found once."""
        if self._eog is None:
            is_eog = llama_cpp.llama_vocab_is_eog
            self._eog = [t for t in range(self.n_vocab) if is_eog(self.vocab, t)]
        return self._eog

    @property
    def bos_text(self) -> str:
        token = int(llama_cpp.llama_vocab_bos(self.vocab))
        return self.special_text(token) if token >= 0 else ""

    @property
    def eos_text(self) -> str:
        token = int(llama_cpp.llama_vocab_eos(self.vocab))
        return self.special_text(token) if token >= 0 else ""

    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    # -- KV cache ---------------------------------------------------------

    def clear_slot(self, slot: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None
