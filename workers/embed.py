"""Runs one embed or rerank job: tokenize, check lengths, hand the inputs to
the embedding engine (which packs them with other requests'), publish the
vectors or scores, account. Plain functions; Celery only calls them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy import Engine

from schemas import keys
from schemas.events import Accepted, Embeddings, ErrorEvent, encode
from schemas.jobs import EmbedJob
from schemas.registry import ModelConfig
from schemas.settings import get_settings
from workers.engine.llama.embedding import EmbeddingEngine, EmbedRequest, cosine
from workers.presence import claim
from workers.sink import reject_payload, report_failure
from workers.usage import record_usage

log = logging.getLogger(__name__)


@dataclass
class EmbedRuntime:
    config: ModelConfig
    engine: EmbeddingEngine
    redis: redis.Redis
    db: Engine
    worker_id: str = ""


class InputError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _fit(tokens: list[int], limit: int, truncate: bool, param: str) -> list[int]:
    if not tokens:
        raise InputError("an input is empty", param)
    if len(tokens) <= limit:
        return tokens
    if not truncate:
        raise InputError(
            f"an input has {len(tokens)} tokens; this model takes at most {limit} "
            "(send truncate: true to cut inputs to that length)",
            param,
        )
    # Keep the closing token ([SEP] / EOS): the model was trained with it.
    return [*tokens[: limit - 1], tokens[-1]]


def build_inputs(runtime: EmbedRuntime, job: EmbedJob) -> tuple[list[list[int]], bool]:
    """Token lists to decode, and whether they are cross-encoder pairs."""
    try:
        return _build_inputs(runtime, job)
    except UnicodeEncodeError as exc:
        # An unpaired surrogate cannot be handed to llama.cpp's tokenizer.
        param = "documents" if job.kind == "rerank" else "input"
        raise InputError(f"an input is not valid Unicode: {exc.reason}", param) from exc


def _build_inputs(runtime: EmbedRuntime, job: EmbedJob) -> tuple[list[list[int]], bool]:
    engine, limit = runtime.engine, runtime.engine.max_input_tokens
    if job.kind == "rerank":
        query = job.query or ""
        if engine.rank:
            pairs = [engine.pair_tokens(query, d) for d in job.documents]
            return [_fit(p, limit, job.truncate, "documents") for p in pairs], True
        texts = [query, *job.documents]
        return [_fit(engine.tokenize(t), limit, job.truncate, "documents") for t in texts], False
    inputs = []
    for item in job.inputs:
        tokens = engine.tokenize(item) if isinstance(item, str) else list(item)
        if any(not 0 <= t < engine.n_vocab for t in tokens):
            raise InputError("an input holds a token id outside the vocabulary", "input")
        inputs.append(_fit(tokens, limit, job.truncate, "input"))
    return inputs, False


def make_answer(
    job: EmbedJob, request: EmbedRequest, inputs: list[list[int]], pairs: bool
) -> Embeddings:
    """The Embeddings event of a finished request: vectors, or rerank scores."""
    vectors = request.vectors
    prompt_tokens = sum(len(t) for t in inputs)
    if job.kind != "rerank":
        return Embeddings.from_matrix(vectors, prompt_tokens)
    if pairs:
        scores = [[float(v[0])] for v in vectors]
    else:
        # A bi-encoder reranks by cosine similarity to the query (as vLLM does).
        query = vectors[0]
        scores = [[cosine(query, d)] for d in vectors[1:]]
    return Embeddings(prompt_tokens, vectors=scores)


# Seconds an embedding request may take once submitted, beyond request_timeout
# for its turn: generous per input token, so only a wedged engine reaches it.
_SECONDS_PER_TOKEN = 0.05


def run_embed(runtime: EmbedRuntime, payload: dict[str, Any]) -> None:
    try:
        job = EmbedJob.model_validate(payload)
    except ValidationError as exc:
        reject_payload(runtime.redis, payload, exc)
        return
    try:
        _run_embed(runtime, job)
    except Exception as exc:
        # After Accepted the API waits on this worker, not on a timeout: every
        # failure must reach the client.
        log.exception("embedding job %s failed", job.request_id)
        report_failure(runtime.redis, job.request_id, f"embedding failed: {exc}")
        raise


def _run_embed(runtime: EmbedRuntime, job: EmbedJob) -> None:
    started = time.perf_counter()
    channel = keys.stream_channel(job.request_id)
    cancelled, first = claim(
        runtime.redis,
        job.request_id,
        runtime.worker_id,
        request_timeout=get_settings().request_timeout,
    )
    if cancelled is not None or not first:
        # The client left, the API queued the job again under another id, or
        # a copy of it already ran (a redelivered message).
        log.info("dropping embedding job %s: cancelled or started already", job.request_id)
        return
    try:
        inputs, pairs = build_inputs(runtime, job)
    except InputError as exc:
        event = ErrorEvent(
            message=str(exc),
            error_type="invalid_request_error",
            code="invalid_request_error",
            status=400,
            param=exc.param,
        )
        runtime.redis.publish(channel, encode(event))
        return
    prompt_tokens = sum(len(t) for t in inputs)
    # The API follows this worker's heartbeat from here on.
    accepted = Accepted(prompt_tokens=prompt_tokens, worker_id=runtime.worker_id)
    runtime.redis.publish(channel, encode(accepted))
    request = EmbedRequest(inputs, normalize=job.normalize)
    runtime.engine.submit(request)
    budget = get_settings().request_timeout + _SECONDS_PER_TOKEN * prompt_tokens
    if not request.wait(budget):
        log.error("embedding job %s did not finish within %.0f s", job.request_id, budget)
        event = ErrorEvent(
            message=f"the request did not finish within {budget:.0f} s",
            error_type="timeout_error",
            code="timeout",
            status=504,
        )
        runtime.redis.publish(channel, encode(event))
        return
    if request.error:
        runtime.redis.publish(channel, encode(ErrorEvent(message=request.error)))
        return
    answer = make_answer(job, request, inputs, pairs)
    runtime.redis.publish(channel, encode(answer))
    record_usage(
        runtime.db,
        request_id=job.request_id,
        model=runtime.config.name,
        endpoint="rerank" if job.kind == "rerank" else "embeddings",
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=0,
        ttft_ms=None,
        duration_ms=(time.perf_counter() - started) * 1000,
        status="completed",
        worker=runtime.worker_id,
    )
