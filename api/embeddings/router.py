"""/v1/embeddings, llama.cpp's /embedding, and /v1/rerank (with aliases)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.catalog import Catalog
from api.deps import CatalogDep, RunnerDep
from api.errors import from_event
from api.routing import StrictJSONRoute
from api.embeddings.bodies import VectorResponse, embedding_body, rerank_body
from api.streaming.jobs import ClientGone, JobRunner, unless_disconnected
from api.openai.requests import (
    bad_request,
    check_inputs,
    embedding_job,
    new_request_id,
    rerank_job,
)
from api.embeddings.protocol import EmbeddingRequest, LlamaEmbeddingRequest, RerankRequest
from schemas.events import Embeddings, ErrorEvent
from schemas.jobs import EmbedJob

router = APIRouter(tags=["embeddings"], route_class=StrictJSONRoute)


async def _model(catalog: Catalog, name: str | None, request: Request, feature: str) -> str:
    return await catalog.require(
        name, authorization=request.headers.get("authorization"), feature=feature
    )


async def _run(request: Request, runner: JobRunner, job: EmbedJob) -> Embeddings | Response:
    async def collect() -> Embeddings | ErrorEvent:
        async with runner.run(job) as stream:
            while True:
                event = await stream.next()
                if isinstance(event, (Embeddings, ErrorEvent)):
                    return event

    try:
        result = await unless_disconnected(request, collect())
    except ClientGone:
        return Response(status_code=499)
    if isinstance(result, ErrorEvent):
        raise from_event(result)
    return result


@router.post("/v1/embeddings", response_model=None)
@router.post("/embeddings", response_model=None, include_in_schema=False)
async def embeddings(
    body: EmbeddingRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await _model(catalog, body.model, request, "embeddings")
    job = embedding_job(body, model, catalog.registry.models.get(model))
    result = await _run(request, runner, job)
    if isinstance(result, Response):
        return result
    return VectorResponse(embedding_body(model, result, body.encoding_format, body.dimensions))


@router.post("/embedding", response_model=None)
async def llama_embedding(
    body: LlamaEmbeddingRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """llama-server's shape: [{"index", "embedding": [vector]}]."""
    # llama-server clients name no model: the first embedding model.
    if body.model is None and request.headers.get("authorization") is None:
        model = await catalog.default("embeddings")
        await catalog.require(model, feature="embeddings")
    else:
        model = await _model(catalog, body.model, request, "embeddings")
    with bad_request():
        items = EmbeddingRequest(input=body.content).items()
        check_inputs(len(items), "content")
        job = EmbedJob(
            request_id=new_request_id("embd"), model=model, inputs=items, truncate=body.truncate
        )
    result = await _run(request, runner, job)
    if isinstance(result, Response):
        return result
    return VectorResponse([{"index": i, "embedding": [v]} for i, v in enumerate(result.matrix())])


@router.post("/v1/rerank", response_model=None)
@router.post("/rerank", response_model=None, include_in_schema=False)
@router.post("/v1/reranking", response_model=None, include_in_schema=False)
@router.post("/reranking", response_model=None, include_in_schema=False)
async def rerank(
    body: RerankRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """The Jina/Cohere shape, sorted by relevance."""
    model = await _model(catalog, body.model, request, "rerank")
    result = await _run(request, runner, rerank_job(body, model))
    if isinstance(result, Response):
        return result
    return JSONResponse(rerank_body(model, result, body.texts(), body.top_n, body.return_documents))
