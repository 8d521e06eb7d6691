"""/v1/embeddings, llama.cpp's /embedding, and /v1/rerank (with aliases)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.catalog import Catalog
from api.deps import CatalogDep, RunnerDep
from api.errors import APIError, from_event
from api.serving.generate import new_request_id
from api.serving.jobs import ClientGone, JobRunner, unless_disconnected
from schemas.embeddings import EmbeddingRequest, LlamaEmbeddingRequest, RerankRequest
from schemas.events import Embeddings, ErrorEvent
from schemas.jobs import EmbedJob

router = APIRouter(tags=["embeddings"])


async def _model(catalog: Catalog, name: str | None, request: Request, feature: str) -> str:
    model = await catalog.require(name, authorization=request.headers.get("authorization"))
    config = catalog.registry.models.get(model)
    enabled = config is None or (config.embeddings if feature == "embeddings" else config.reranking)
    if not enabled:
        setting = "embeddings" if feature == "embeddings" else "reranking"
        raise APIError(
            400,
            f"model '{model}' does not serve {feature} (its config would need `{setting}: true`)",
            code="unsupported_model",
            param="model",
        )
    return model


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


class VectorResponse(Response):
    """JSON with numpy rows serialized by orjson: an order of magnitude less
    CPU than `json` for thousands of floats per response."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _shorten(matrix: npt.NDArray[np.float32], dimensions: int | None) -> npt.NDArray[np.float32]:
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    if dimensions is None or dimensions == width:
        return matrix
    if dimensions > width:
        raise APIError(
            400, f"dimensions is {dimensions}; this model gives {width}", param="dimensions"
        )
    head = matrix[:, :dimensions].astype(np.float64)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    shortened: npt.NDArray[np.float32] = (head / norms).astype(np.float32)
    return shortened


def _encode(vector: npt.NDArray[np.float32], fmt: str) -> npt.NDArray[np.float32] | str:
    if fmt == "base64":
        # What the openai client decodes: little-endian float32.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector


@router.post("/v1/embeddings", response_model=None)
async def embeddings(
    body: EmbeddingRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await _model(catalog, body.model, request, "embeddings")
    config = catalog.registry.models.get(model)
    if body.dimensions is not None and config is not None and not config.matryoshka:
        raise APIError(
            400,
            f"model '{model}' cannot shorten its embeddings (not a Matryoshka model)",
            param="dimensions",
        )
    job = EmbedJob(
        request_id=new_request_id("embd"), model=model, inputs=body.items(), truncate=body.truncate
    )
    result = await _run(request, runner, job)
    if isinstance(result, Response):
        return result
    matrix = _shorten(result.matrix(), body.dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(row, body.encoding_format)}
        for i, row in enumerate(matrix)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return VectorResponse({"object": "list", "data": data, "model": model, "usage": usage})


@router.post("/embedding", response_model=None)
async def llama_embedding(
    body: LlamaEmbeddingRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """llama-server's shape: [{"index", "embedding": [vector]}]."""
    model = await _model(catalog, body.model, request, "embeddings")
    items = EmbeddingRequest(input=body.content).items()
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
    texts = body.texts()
    job = EmbedJob(
        request_id=new_request_id("rerank"),
        model=model,
        kind="rerank",
        query=body.query,
        documents=texts,
        truncate=body.truncate,
    )
    result = await _run(request, runner, job)
    if isinstance(result, Response):
        return result
    ranked: list[dict[str, Any]] = []
    for index, score in sorted(enumerate(result.vectors), key=lambda p: p[1][0], reverse=True):
        item: dict[str, Any] = {"index": index, "relevance_score": score[0]}
        if body.return_documents:
            item["document"] = {"text": texts[index]}
        ranked.append(item)
    if body.top_n is not None:
        ranked = ranked[: body.top_n]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return JSONResponse({"model": model, "object": "list", "results": ranked, "usage": usage})
