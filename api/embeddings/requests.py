"""Embedding and rerank requests -> the jobs workers run. Shared by the HTTP
routers and by bulk-job validation."""

from __future__ import annotations

from api.embeddings.protocol import EmbeddingRequest, LlamaEmbeddingRequest, RerankRequest
from api.errors import APIError, bad_request
from api.streaming.jobs import new_request_id
from api.streaming.limits import limits
from schemas.jobs import EmbedJob
from schemas.registry import ModelConfig
from schemas.settings import Settings


def check_inputs(count: int, param: str, settings: Settings | None = None) -> None:
    limit = limits(settings).max_embedding_inputs
    if count > limit:
        raise APIError(
            400, f"at most {limit} inputs per request (INFERQ_MAX_EMBEDDING_INPUTS)", param=param
        )


def embedding_job(body: EmbeddingRequest, model: str, config: ModelConfig | None) -> EmbedJob:
    """The job; a 400 when `dimensions` asks a model that cannot shorten."""
    check_inputs(len(body.items()), "input")
    if body.dimensions is not None and config is not None and not config.matryoshka:
        raise APIError(
            400,
            f"model '{model}' cannot shorten its embeddings (not a Matryoshka model)",
            param="dimensions",
        )
    with bad_request():
        return EmbedJob(
            request_id=new_request_id("embd"),
            model=model,
            inputs=body.items(),
            truncate=body.truncate,
        )


def llama_embedding_job(body: LlamaEmbeddingRequest, model: str) -> EmbedJob:
    """llama-server's /embedding: `content` read as /v1/embeddings reads `input`."""
    with bad_request():
        items = EmbeddingRequest(input=body.content).items()
        check_inputs(len(items), "content")
        return EmbedJob(
            request_id=new_request_id("embd"), model=model, inputs=items, truncate=body.truncate
        )


def rerank_job(body: RerankRequest, model: str) -> EmbedJob:
    check_inputs(len(body.documents), "documents")
    with bad_request():
        return EmbedJob(
            request_id=new_request_id("rerank"),
            model=model,
            kind="rerank",
            query=body.query,
            documents=body.texts(),
            truncate=body.truncate,
        )
