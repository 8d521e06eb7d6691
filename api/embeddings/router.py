"""/v1/embeddings, llama.cpp's /embedding, and /v1/rerank (with aliases)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.accounts.principal import current_principal
from api.deps import CatalogDep, RunnerDep
from api.embeddings.bodies import VectorResponse, embedding_body, rerank_body
from api.embeddings.protocol import EmbeddingRequest, LlamaEmbeddingRequest, RerankRequest
from api.embeddings.requests import embedding_job, llama_embedding_job, rerank_job
from api.routing import StrictJSONRoute
from api.streaming.relay import Collected, collect
from schemas.events import Embeddings

router = APIRouter(tags=["embeddings"], route_class=StrictJSONRoute)


@router.post("/v1/embeddings", response_model=None)
@router.post("/embeddings", response_model=None, include_in_schema=False)
async def embeddings(
    body: EmbeddingRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await catalog.for_request(request, body.model, "embeddings")
    job = embedding_job(body, model, catalog.registry.models.get(model))

    def render(answer: Collected[Embeddings]) -> Response:
        vectors = embedding_body(model, answer.end, body.encoding_format, body.dimensions)
        return VectorResponse(vectors)

    return await collect(request, runner, job, render)


def _llama_vectors(answer: Collected[Embeddings]) -> Response:
    matrix = answer.end.matrix()
    return VectorResponse([{"index": i, "embedding": [v]} for i, v in enumerate(matrix)])


@router.post("/embedding", response_model=None)
async def llama_embedding(
    body: LlamaEmbeddingRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """llama-server's shape: [{"index", "embedding": [vector]}]."""
    # llama-server clients name no model: the first embedding model. With
    # auth on the bearer token is a key, never a model name.
    principal = current_principal(request)
    if body.model is None and (
        principal.key is not None or request.headers.get("authorization") is None
    ):
        default = await catalog.default("embeddings")
        principal.require_model(default)
        model = await catalog.require(default, feature="embeddings")
    else:
        model = await catalog.for_request(request, body.model, "embeddings")
    return await collect(request, runner, llama_embedding_job(body, model), _llama_vectors)


@router.post("/v1/rerank", response_model=None)
@router.post("/rerank", response_model=None, include_in_schema=False)
@router.post("/v1/reranking", response_model=None, include_in_schema=False)
@router.post("/reranking", response_model=None, include_in_schema=False)
async def rerank(
    body: RerankRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """The Jina/Cohere shape, sorted by relevance."""
    model = await catalog.for_request(request, body.model, "rerank")

    def render(answer: Collected[Embeddings]) -> Response:
        scores = rerank_body(model, answer.end, body.texts(), body.top_n, body.return_documents)
        return JSONResponse(scores)

    return await collect(request, runner, rerank_job(body, model), render)
