"""/v1/generate: vLLM-style sampling parameters, best_of, beam search, and
mock responses for client tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.catalog import GENERATION
from api.deps import CatalogDep, RunnerDep
from api.routing import StrictJSONRoute
from api.openai import bodies
from api.openai.chunks import DONE, ChunkFormat
from api.openai.serving import SSE_HEADERS, serve
from api.openai.requests import bad_request, check_generate, new_request_id
from schemas.jobs import BeamOptions, GenerateJob
from api.generate.protocol import GenerateRequest

router = APIRouter(tags=["generation"], route_class=StrictJSONRoute)


def _mock(body: GenerateRequest, model: str) -> Response:
    """The canned answer, shaped like a real one; no job is queued."""
    request_id = new_request_id("gen")
    created = int(time.time())
    text = body.mock_response or ""
    if body.stream:
        fmt = ChunkFormat(
            request_id=request_id, model=model, created=created, chat=False, kind="generation.chunk"
        )

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(body.n):
                yield fmt.token(index, bodies.json_literal(text))
                yield fmt.finish(index, "stop")
            yield DONE

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=SSE_HEADERS)
    choice = {
        "text": text,
        "finish_reason": "stop",
        "cumulative_logprob": None,
        "mean_logprob": None,
        "logprobs": None,
    }
    return JSONResponse(
        {
            "id": request_id,
            "object": "generation",
            "created": created,
            "model": model,
            "choices": [{"index": i, **choice} for i in range(body.n)],
            "text": [text] * body.n,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
    )


@router.post("/v1/generate", response_model=None)
async def generate(
    body: GenerateRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await catalog.require(
        body.model, authorization=request.headers.get("authorization"), feature=GENERATION
    )
    if body.mock_response is not None:
        return _mock(body, model)
    beam = None
    with bad_request():
        if body.use_beam_search:
            beam = BeamOptions(
                width=body.width,
                length_penalty=body.length_penalty,
                early_stopping=body.early_stopping,
            )
        job = GenerateJob(
            request_id=new_request_id("gen"),
            model=model,
            endpoint="generate" if body.prompt is not None else "generate.chat",
            prompt=body.prompt,
            messages=[m.flatten() for m in body.messages] if body.messages else None,
            sampling=body.sampling(),
            stream=body.stream,
            beam=beam,
        )
    check_generate(job, catalog.registry.models.get(model), request.app.state.settings)
    render = bodies.generate_body(body.n, with_logprobs=body.logprobs is not None)
    return await serve(request, runner, job, include_usage=False, render=render)
