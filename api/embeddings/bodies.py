"""Response bodies of /v1/embeddings and /v1/rerank, from a worker's answer.
Shared by the routers and by bulk-job output."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi.responses import Response

from api.errors import APIError
from schemas.events import Embeddings


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


def embedding_body(
    model: str, result: Embeddings, encoding_format: str, dimensions: int | None
) -> dict[str, Any]:
    matrix = _shorten(result.matrix(), dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(row, encoding_format)}
        for i, row in enumerate(matrix)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def rerank_body(
    model: str, result: Embeddings, texts: list[str], top_n: int | None, return_documents: bool
) -> dict[str, Any]:
    """The Jina/Cohere shape, sorted by relevance."""
    ranked: list[dict[str, Any]] = []
    for index, score in sorted(enumerate(result.vectors), key=lambda p: p[1][0], reverse=True):
        item: dict[str, Any] = {"index": index, "relevance_score": score[0]}
        if return_documents:
            item["document"] = {"text": texts[index]}
        ranked.append(item)
    if top_n is not None:
        ranked = ranked[:top_n]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"model": model, "object": "list", "results": ranked, "usage": usage}
