"""/v1/generate: its job (sampling, best_of, beam search) and the canned
answer of `mock_response`. A real job is answered by the OpenAI serving code
(api/openai/serving.py) with this endpoint's body and chunk object."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response

from api.errors import bad_request
from api.generate.protocol import GenerateRequest
from api.openai import bodies
from api.openai.chunks import ChunkFormat
from api.streaming.jobs import new_request_id
from api.streaming.limits import check_generate
from api.streaming.relay import DONE, event_stream
from schemas.jobs import BeamOptions, GenerateJob
from schemas.registry import ModelConfig
from schemas.settings import Settings


def generate_job(
    body: GenerateRequest, model: str, config: ModelConfig | None, settings: Settings
) -> GenerateJob:
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
    return check_generate(job, config, settings)


def mock(body: GenerateRequest, model: str) -> Response:
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

        return event_stream(chunks())
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
