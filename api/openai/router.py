"""/v1/chat/completions and /v1/completions: validate, queue, relay."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.catalog import GENERATION
from api.deps import CatalogDep, RunnerDep
from api.routing import StrictJSONRoute
from api.openai import bodies
from api.openai.serving import serve
from api.openai.requests import (
    bad_request,
    chat_job,
    check_generate,
    completion_job,
    new_request_id,
)
from schemas.jobs import GenerateJob, Message
from api.openai.protocol import ChatCompletionRequest, CompletionRequest, EditRequest

router = APIRouter(tags=["generation"], route_class=StrictJSONRoute)


async def _model(catalog: CatalogDep, name: str | None, request: Request) -> str:
    return await catalog.require(
        name, authorization=request.headers.get("authorization"), feature=GENERATION
    )


@router.post("/v1/chat/completions", response_model=None)
# llama-server answers its OpenAI routes without the prefix too (but
# /completions is its own completion endpoint, see llama_server.py).
@router.post("/chat/completions", response_model=None, include_in_schema=False)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await _model(catalog, body.model, request)
    job = chat_job(body, model, catalog.registry.models.get(model), request.app.state.settings)
    return await serve(request, runner, job, include_usage=body.include_usage)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await _model(catalog, body.model, request)
    job = completion_job(
        body, model, catalog.registry.models.get(model), request.app.state.settings
    )
    return await serve(request, runner, job, include_usage=body.include_usage)


@router.post("/v1/edits", response_model=None)
async def edits(
    body: EditRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """The legacy edits API: `instruction` applied to `input`, through the
    model's chat template; answered as `choices[].text`."""
    model = await _model(catalog, body.model, request)
    messages = [Message(role="system", content=body.instruction)]
    if body.input:
        messages.append(Message(role="user", content=body.input))
    with bad_request():
        job = GenerateJob(
            request_id=new_request_id("edit"),
            model=model,
            endpoint="edits",
            messages=messages,
            sampling=body.sampling(),
            stream=False,
        )
    check_generate(job, catalog.registry.models.get(model), request.app.state.settings)
    return await serve(request, runner, job, include_usage=False, render=bodies.edit_body)
