"""llama-server's own HTTP API: /completion, /infill, /tokenize, /detokenize
(/props is in llama_props). Clients written for llama.cpp's server work
unchanged; answers and errors differ only where documented in the README."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.catalog import Catalog
from api.deps import CatalogDep, RunnerDep
from api.errors import APIError
from api.routing import StrictJSONRoute
from api.llama.common import load_overrides, pick_model
from api.llama.serving import serve_completion
from api.openai.requests import bad_request, check_generate
from api.vocab import Vocab, VocabCache, VocabUnavailable
from schemas.jobs import GenerateJob, SamplingOptions
from api.llama.protocol import (
    CompletionRequest,
    DetokenizeRequest,
    InfillRequest,
    LlamaOptions,
    TokenizeRequest,
)

router = APIRouter(tags=["llama.cpp"], route_class=StrictJSONRoute)
Body = TypeVar("Body", bound=LlamaOptions)


def _invalid(exc: ValidationError) -> RequestValidationError:
    # Answered as any other bad request body: a 400 in the error envelope.
    return RequestValidationError(exc.errors(include_url=False))


async def _with_defaults(body: Body, request: Request, model: str) -> Body:
    """Fields the request leaves out take the defaults set through POST /props."""
    settings = request.app.state.settings
    if not settings.props_writable:
        return body
    overrides = await load_overrides(request.app.state.redis, model)
    given = body.model_fields_set
    if "max_tokens" in given:
        given = given | {"n_predict"}
    missing = {k: v for k, v in overrides.items() if k not in given}
    if not missing:
        return body
    try:
        return type(body).model_validate({**missing, **body.model_dump(exclude_unset=True)})
    except ValidationError as exc:
        raise _invalid(exc) from exc


def _sampling(body: LlamaOptions) -> SamplingOptions:
    try:
        return body.sampling()
    except ValidationError as exc:
        raise _invalid(exc) from exc


def _job(
    request: Request, catalog: Catalog, body: LlamaOptions, model: str, endpoint: str, **fields: Any
) -> GenerateJob:
    sampling = _sampling(body)
    with bad_request():
        job = GenerateJob(
            request_id=f"llamacmpl-{uuid.uuid4().hex}",
            model=model,
            endpoint=endpoint,  # type: ignore[arg-type]
            sampling=sampling,
            stream=body.stream,
            id_slot=None if body.id_slot < 0 else body.id_slot,
            **fields,
        )
    return check_generate(job, catalog.registry.models.get(model), request.app.state.settings)


@router.post("/completion", response_model=None)
@router.post("/completions", response_model=None, include_in_schema=False)
async def completion(
    body: CompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """llama-server's completion: the prompt (strings and token ids) is
    evaluated verbatim, without the model's completion template."""
    model = await pick_model(catalog, body.model)
    body = await _with_defaults(body, request, model)
    job = _job(request, catalog, body, model, "llama.completion", prompt_parts=body.prompt_parts())
    return await serve_completion(request, runner, job, body.echo())


@router.post("/infill", response_model=None)
async def infill(
    body: InfillRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """Fill in the middle, with the model's FIM tokens (a 400 when it has none)."""
    model = await pick_model(catalog, body.model)
    body = await _with_defaults(body, request, model)
    job = _job(request, catalog, body, model, "llama.infill", infill=body.infill())
    return await serve_completion(request, runner, job, body.echo())


async def _vocab(request: Request, catalog: Catalog, name: str | None) -> Vocab:
    model = await pick_model(catalog, name)
    vocabs: VocabCache = request.app.state.vocabs
    try:
        return await run_in_threadpool(vocabs.get, model, catalog.registry.models.get(model))
    except VocabUnavailable as exc:
        raise APIError(503, str(exc), code="vocab_unavailable") from exc


def _bad_token(token: int, vocab: Vocab, param: str) -> APIError:
    return APIError(
        400, f"token id {token} is not in the vocabulary (0 to {vocab.n_tokens - 1})", param=param
    )


def _piece(piece: bytes) -> str | list[int]:
    # llama-server: the piece as a string when it is valid UTF-8, else its bytes.
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, catalog: CatalogDep) -> dict[str, Any]:
    vocab = await _vocab(request, catalog, body.model)

    def work() -> list[int] | list[dict[str, Any]]:
        tokens = vocab.tokenize_mixed(
            body.parts(), add_special=body.add_special, parse_special=body.parse_special
        )
        bad = vocab.invalid(tokens)
        if bad is not None:
            raise _bad_token(bad, vocab, "content")
        if not body.with_pieces:
            return tokens
        return [{"id": t, "piece": _piece(vocab.piece(t))} for t in tokens]

    return {"tokens": await run_in_threadpool(work)}


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, request: Request, catalog: CatalogDep
) -> dict[str, str]:
    vocab = await _vocab(request, catalog, body.model)
    bad = vocab.invalid(body.tokens)
    if bad is not None:
        raise _bad_token(bad, vocab, "tokens")
    return {"content": await run_in_threadpool(vocab.detokenize, body.tokens)}
