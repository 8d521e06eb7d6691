"""/v1/chat/completions and /v1/completions: validate, queue, relay."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import CatalogDep, RunnerDep
from api.errors import APIError
from api.serving.generate import new_request_id, serve
from schemas.jobs import GenerateJob
from schemas.openai import ChatCompletionRequest, CompletionRequest

router = APIRouter(tags=["generation"])


async def _model(catalog: CatalogDep, name: str | None) -> str:
    resolved = await catalog.resolve(name)
    if resolved is None:
        if name is None:
            raise APIError(400, "you must provide a model parameter", param="model")
        raise APIError(
            404,
            f"The model '{name}' does not exist",
            code="model_not_found",
            param="model",
        )
    return resolved


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await _model(catalog, body.model)
    job = GenerateJob(
        request_id=new_request_id("chatcmpl"),
        model=model,
        endpoint="chat.completions",
        messages=[m.flatten() for m in body.messages],
        sampling=body.sampling(),
        stream=body.stream,
    )
    return await serve(request, runner, job, include_usage=body.include_usage)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    model = await _model(catalog, body.model)
    job = GenerateJob(
        request_id=new_request_id("cmpl"),
        model=model,
        endpoint="completions",
        prompt=body.prompt_text(),
        sampling=body.sampling(),
        stream=body.stream,
    )
    return await serve(request, runner, job, include_usage=body.include_usage)
