"""/v1/chat/completions, /v1/completions and /v1/edits: validate, queue, relay."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.catalog import GENERATION, Catalog
from api.deps import CatalogDep, RunnerDep
from api.openai import bodies
from api.openai.bodies import Renderer
from api.openai.protocol import ChatCompletionRequest, CompletionRequest, EditRequest
from api.openai.requests import chat_job, completion_job, edit_job
from api.openai.serving import serve
from api.routing import StrictJSONRoute
from api.streaming.jobs import JobRunner
from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig
from schemas.settings import Settings

router = APIRouter(tags=["generation"], route_class=StrictJSONRoute)
Body = TypeVar("Body", ChatCompletionRequest, CompletionRequest, EditRequest)


async def _answer(
    body: Body,
    request: Request,
    catalog: Catalog,
    runner: JobRunner,
    build: Callable[[Body, str, ModelConfig | None, Settings], GenerateJob],
    render: Renderer = bodies.openai_body,
) -> Response:
    model = await catalog.for_request(request, body.model, GENERATION)
    job = build(body, model, catalog.registry.models.get(model), request.app.state.settings)
    # Usage is a chunk of a stream: an edit, never streamed, has none.
    return await serve(request, runner, job, include_usage=body.include_usage, render=render)


@router.post("/v1/chat/completions", response_model=None)
# llama-server answers its OpenAI routes without the prefix too (but
# /completions is its own completion endpoint, see api/llama/router.py).
@router.post("/chat/completions", response_model=None, include_in_schema=False)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    return await _answer(body, request, catalog, runner, chat_job)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    return await _answer(body, request, catalog, runner, completion_job)


@router.post("/v1/edits", response_model=None)
async def edits(
    body: EditRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """The legacy edits API: `instruction` applied to `input`, through the
    model's chat template; answered as `choices[].text`."""
    return await _answer(body, request, catalog, runner, edit_job, bodies.edit_body)
