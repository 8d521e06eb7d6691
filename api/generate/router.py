"""/v1/generate: vLLM-style sampling parameters, best_of, beam search, and
mock responses for client tests."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.catalog import GENERATION
from api.deps import CatalogDep, RunnerDep
from api.generate.protocol import GenerateRequest
from api.generate.serving import generate_job, mock
from api.openai import bodies
from api.openai.serving import serve
from api.routing import StrictJSONRoute

router = APIRouter(tags=["generation"], route_class=StrictJSONRoute)


@router.post("/v1/generate", response_model=None)
async def generate(
    body: GenerateRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await catalog.for_request(request, body.model, GENERATION)
    if body.mock_response is not None:
        return mock(body, model)
    config = catalog.registry.models.get(model)
    job = generate_job(body, model, config, request.app.state.settings)
    render = bodies.generate_body(body.n, with_logprobs=body.logprobs is not None)
    return await serve(request, runner, job, include_usage=False, render=render)
