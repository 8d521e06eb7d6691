"""/v1/chat/completions and /v1/completions: validate, queue, relay."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import CatalogDep, RunnerDep
from api.serving import bodies
from api.serving.generate import serve
from api.serving.requests import chat_job, completion_job, new_request_id
from schemas.jobs import GenerateJob, Message
from schemas.openai import ChatCompletionRequest, CompletionRequest, EditRequest

router = APIRouter(tags=["generation"])


async def _model(catalog: CatalogDep, name: str | None, request: Request) -> str:
    return await catalog.require(name, authorization=request.headers.get("authorization"))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    job = chat_job(body, await _model(catalog, body.model, request))
    return await serve(request, runner, job, include_usage=body.include_usage)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    job = completion_job(body, await _model(catalog, body.model, request))
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
    job = GenerateJob(
        request_id=new_request_id("edit"),
        model=model,
        endpoint="edits",
        messages=messages,
        sampling=body.sampling(),
        stream=False,
    )
    return await serve(request, runner, job, include_usage=False, render=bodies.edit_body)
