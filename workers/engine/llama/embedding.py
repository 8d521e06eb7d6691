"""Embeddings and rerank scores on llama.cpp, packed across requests.

One engine thread owns an embedding context. It takes the inputs of every
waiting request, first come first served, and packs as many as fit (at most
`n_batch` tokens and `n_seq` sequences) into one decode, each input its own
sequence; llama.cpp pools every sequence on its own, so an input's vector
does not depend on what it was packed with.

The token budget is deliberately small (512 by default): in one packed
encode every token attends over the whole micro-batch (the mask hides the
other sequences, but the work is done), so the attention cost per input
grows with the batch. Measured with all-MiniLM-L6-v2 on 2 threads (~25-token
inputs): 512 tokens per decode gave 197 inputs/s, 2048 tokens (64 inputs)
only 89."""

from __future__ import annotations

import collections
import ctypes
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from schemas.llama_vocab import load_model, tokenize
from schemas.worker_stats import WorkStats
from workers.engine.lifecycle import EngineThread
from workers.engine.llama.model import new_context
from workers.engine.types import BULK, INTERACTIVE, EmbedRequest, cosine

log = logging.getLogger("inferq.embedding")

# EmbedRequest and cosine are engine-neutral (workers.engine.types); they are
# named here too, beside the engine that fills them.
__all__ = ["POOLING", "EmbedRequest", "EmbedStats", "EmbeddingEngine", "cosine"]

POOLING = {
    "none": llama_cpp.LLAMA_POOLING_TYPE_NONE,
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
    "rank": llama_cpp.LLAMA_POOLING_TYPE_RANK,
}


@dataclass
class EmbedStats:
    decodes: int = 0
    inputs: int = 0
    tokens: int = 0


class EmbeddingEngine(EngineThread):
    def __init__(
        self,
        path: Path,
        *,
        pooling: str | None,
        n_batch: int = 512,
        n_seq: int = 64,
        max_input: int = 2048,
        n_threads: int | None = None,
        gpu_layers: int = 0,
    ) -> None:
        super().__init__("embedding-engine")
        model = load_model(path, gpu_layers=gpu_layers)
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        # An input may not outrun the model's position embeddings (BERT has
        # 512): llama.cpp aborts the process on such an input.
        trained = int(llama_cpp.llama_model_n_ctx_train(model))
        self.max_input = min(max_input, trained) if trained > 0 else max_input
        # The context holds one decode: the packing budget, or one input of
        # the longest allowed length, whichever is larger.
        n_ctx = max(n_batch, self.max_input)
        cparams = llama_cpp.llama_context_default_params()
        cparams.embeddings = True
        cparams.pooling_type = (
            POOLING[pooling] if pooling else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        )
        # A non-causal model sees a whole sequence in one micro-batch, so the
        # micro-batch is the batch; the context holds one batch at a time.
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True
        failure = f"llama.cpp could not create an embedding context for {path}"
        self.ctx = new_context(model, cparams, threads=n_threads or 1, failure=failure)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.pooling = int(llama_cpp.llama_pooling_type(self.ctx))
        if self.pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            raise ValueError(f"{path}: pooling 'none' gives no sequence embeddings")
        self.rank = self.pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK
        self.n_out = (
            int(llama_cpp.llama_model_n_cls_out(model))
            if self.rank
            else int(llama_cpp.llama_model_n_embd(model))
        )
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.encoder_only = not bool(llama_cpp.llama_model_has_decoder(model))
        self.stats = EmbedStats()
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        # Inputs waiting, by priority (interactive first).
        self._queues: dict[int, collections.deque[tuple[EmbedRequest, int]]] = {
            INTERACTIVE: collections.deque(),
            BULK: collections.deque(),
        }
        self._thread.start()

    # -- public -------------------------------------------------------------

    @property
    def max_input_tokens(self) -> int:
        return self.max_input

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.vocab, text, add_special=True, parse_special=False)

    def pair_tokens(self, query: str, document: str) -> list[int]:
        """A cross-encoder's input: [CLS] query [SEP] document [SEP]."""
        first = tokenize(self.vocab, query, add_special=True, parse_special=False)
        second = tokenize(self.vocab, document, add_special=True, parse_special=False)
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        if second and second[0] == bos:
            second = second[1:]  # one [CLS] only, at the start
        return first + second

    def submit(self, request: EmbedRequest) -> None:
        for tokens in request.inputs:
            if not 0 < len(tokens) <= self.max_input:
                raise ValueError(f"an input has {len(tokens)} tokens; 1 to {self.max_input} fit")
        with self._wake:
            queue = self._queues[BULK if request.priority > INTERACTIVE else INTERACTIVE]
            queue.extend((request, i) for i in range(len(request.inputs)))
            if not request.inputs:
                request.done()
            self._wake.notify()

    def metrics(self) -> WorkStats:
        """What an embedding engine counts: tokens embedded, decodes, the
        inputs packed into them (its busy slots) and the inputs waiting."""
        waiting = sum(len(queue) for queue in list(self._queues.values()))
        stats = self.stats
        return WorkStats(
            prompt_tokens=stats.tokens,
            decodes=stats.decodes,
            busy_slots=stats.inputs,
            deferred=waiting,
        )

    def close(self) -> None:
        self._stop_thread()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    # -- engine thread --------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (any(self._queues.values()) or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                packed = self._take()
            try:
                self._decode(packed)
            except Exception as exc:  # a failed decode fails its requests only
                log.exception("embedding decode failed")
                for request, _ in packed:
                    request.error = f"embedding failed: {exc}"
                    request.done()
        for queue in self._queues.values():
            for request in {id(r): r for r, _ in queue}.values():
                request.error = "worker shutting down"
                request.done()

    def _take(self) -> list[tuple[EmbedRequest, int]]:
        packed: list[tuple[EmbedRequest, int]] = []
        tokens = 0
        for queue in (self._queues[INTERACTIVE], self._queues[BULK]):
            while queue and len(packed) < self.n_seq:
                request, index = queue[0]
                size = len(request.inputs[index])
                if packed and tokens + size > self.n_batch:
                    return packed
                queue.popleft()
                packed.append((request, index))
                tokens += size
        return packed

    def _decode(self, packed: list[tuple[EmbedRequest, int]]) -> None:
        batch = self._batch
        n = 0
        for seq, (request, index) in enumerate(packed):
            for pos, token in enumerate(request.inputs[index]):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = 1
                n += 1
        batch.n_tokens = n
        if self.memory:
            llama_cpp.llama_memory_clear(self.memory, True)
        call = llama_cpp.llama_encode if self.encoder_only else llama_cpp.llama_decode
        rc = call(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama.cpp returned {rc}")
        self.stats.decodes += 1
        self.stats.inputs += len(packed)
        self.stats.tokens += n
        for seq, (request, index) in enumerate(packed):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            values = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_out,)
            ).astype(np.float64)
            if request.normalize and not self.rank:
                norm = math.sqrt(float(np.dot(values, values)))
                if norm > 0:
                    values = values / norm
            request._out[index] = values.astype(np.float32)
            if len(request._out) == len(request.inputs):
                request.vectors = [request._out[i] for i in range(len(request.inputs))]
                request.done()
