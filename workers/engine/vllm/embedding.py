"""The vLLM Embedder (workers.engine.interface): embeddings through a pooling
model (`convert="embed"`), rerank scores through a one-label sequence
classifier (`convert="classify"`, a cross-encoder). Each input is one
AsyncLLM.encode on the Runner's loop; vLLM batches them."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import numpy as np

from schemas.worker_stats import WorkStats
from workers.engine.types import EmbedRequest
from workers.engine.vllm.runner import Runner
from workers.engine.vllm.tokenizer import HfTokenizer

log = logging.getLogger("inferq.vllm")


class VllmEmbedder:
    def __init__(self, runner: Runner, *, rank: bool, max_input: int) -> None:
        self._runner = runner
        llm = runner.llm
        self._rank = rank
        self._max_input = min(max_input, int(llm.model_config.max_model_len))
        self._tokenizer = HfTokenizer.of(llm)
        self._ids = itertools.count()
        self._tokens = 0

    @property
    def max_input_tokens(self) -> int:
        return self._max_input

    @property
    def n_vocab(self) -> int:
        return self._tokenizer.n_vocab

    @property
    def rank(self) -> bool:
        return self._rank

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text, add_special=True)

    def pair_tokens(self, query: str, document: str) -> list[int]:
        return self._tokenizer.pair(query, document)

    def submit(self, request: EmbedRequest) -> None:
        self._runner.spawn(self._serve(request))

    def metrics(self) -> WorkStats:
        return WorkStats(prompt_tokens=self._tokens)

    def close(self) -> None:
        self._runner.close()

    async def _serve(self, request: EmbedRequest) -> None:
        try:
            rows = await asyncio.gather(*(self._encode(request, i) for i in request.inputs))
            request.vectors = [np.asarray(r, dtype=np.float32) for r in rows]
            self._tokens += sum(len(i) for i in request.inputs)
        except Exception as exc:
            log.exception("an embedding request failed in vLLM")
            request.error = f"embedding failed: {type(exc).__name__}: {exc}"
        request.done()

    async def _encode(self, request: EmbedRequest, tokens: list[int]) -> Any:
        from vllm.pooling_params import PoolingParams

        if self._rank:
            params = PoolingParams(task="classify")
            second = self._tokenizer.second_text_at(tokens)
            if second is not None:
                # A BERT cross-encoder tells the document from the query by
                # its token types, which vLLM takes as the index of the first
                # type-1 token (what its own scoring path hands the model).
                params = PoolingParams(
                    task="classify", extra_kwargs={"compressed_token_type_ids": second}
                )
        else:
            params = PoolingParams(task="embed", use_activation=request.normalize)
        prompt: dict[str, Any] = {"prompt_token_ids": list(tokens)}
        final = None
        async for output in self._runner.llm.encode(
            prompt, params, f"embed-{next(self._ids)}", priority=request.priority
        ):
            final = output
        assert final is not None
        return final.outputs.data.float().numpy().reshape(-1)
