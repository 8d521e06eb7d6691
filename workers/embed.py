"""Runs one embed or rerank job: tokenize, check lengths, hand the inputs to
the embedding engine (which packs them with other requests'), publish the
vectors or scores, account. Plain functions; Celery only calls them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine

from schemas.events import Accepted, Embeddings, ErrorEvent
from schemas.jobs import EmbedJob
from schemas.registry import ModelConfig
from schemas.settings import get_settings
from workers.engine.interface import Embedder
from workers.engine.types import EmbedRequest, cosine
from workers.job import Claim, accounting, claim_job, publish, run_job
from workers.sink import bad_request

log = logging.getLogger(__name__)


@dataclass
class EmbedRuntime:
    config: ModelConfig
    engine: Embedder
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
    def work(job: EmbedJob) -> None:
        _run_embed(runtime, job)

    run_job(
        runtime, payload, EmbedJob, work, log=log, label="embedding job", failure="embedding failed"
    )


def _run_embed(runtime: EmbedRuntime, job: EmbedJob) -> None:
    endpoint = "rerank" if job.kind == "rerank" else "embeddings"
    usage = accounting(runtime, request_id=job.request_id, endpoint=endpoint, account=job.account)
    claim = claim_job(runtime, job.request_id)
    if claim is not Claim.RUN:
        # The client left, the API queued the job again under another id, or
        # a copy of it already ran (a redelivered message).
        log.info("dropping embedding job %s: cancelled or started already", job.request_id)
        if claim is Claim.CANCELLED:
            # Its row (and its key's reserved tokens given back); a requeued
            # or duplicate copy is accounted by the copy that runs.
            usage("cancelled", 0, 0, None)
        return
    try:
        inputs, pairs = build_inputs(runtime, job)
    except InputError as exc:
        publish(runtime, job.request_id, bad_request(str(exc), param=exc.param))
        usage("rejected", 0, 0, None)
        return
    prompt_tokens = sum(len(t) for t in inputs)
    # The API follows this worker's heartbeat from here on.
    accepted = Accepted(prompt_tokens=prompt_tokens, worker_id=runtime.worker_id)
    publish(runtime, job.request_id, accepted)
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
        publish(runtime, job.request_id, event)
        usage("failed", prompt_tokens, 0, None)
        return
    if request.error:
        publish(runtime, job.request_id, ErrorEvent(message=request.error))
        usage("failed", prompt_tokens, 0, None)
        return
    answer = make_answer(job, request, inputs, pairs)
    publish(runtime, job.request_id, answer)
    usage("completed", answer.prompt_tokens, 0, None)
