"""llama-server's own HTTP API: /completion, /infill, /tokenize, /detokenize
(/props: props.py). Clients written for llama.cpp's server work
unchanged; answers and errors differ only where documented in the README."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.accounts.principal import current_principal
from api.catalog import Catalog
from api.deps import CatalogDep, RunnerDep
from api.errors import APIError
from api.llama.common import require_llama_cpp
from api.llama.protocol import (
    DetokenizeRequest,
    InfillRequest,
    LlamaCompletionRequest,
    TokenizeRequest,
)
from api.llama.requests import llama_job, with_defaults
from api.llama.serving import serve_completion
from api.routing import StrictJSONRoute
from api.vocab import AnyVocab, VocabCache, VocabUnavailable

router = APIRouter(tags=["llama.cpp"], route_class=StrictJSONRoute)


@router.post("/completion", response_model=None)
@router.post("/completions", response_model=None, include_in_schema=False)
async def completion(
    body: LlamaCompletionRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """llama-server's completion: the prompt (strings and token ids) is
    evaluated verbatim, without the model's completion template."""
    model = await catalog.named_or_default(body.model)
    # Before anything about the model can show in an error.
    current_principal(request).require_model(model)
    config = catalog.registry.models.get(model)
    require_llama_cpp(config, model, "/completion", "POST /v1/completions")
    body = await with_defaults(body, request, model)
    job = llama_job(
        request, body, model, config, "llama.completion", prompt_parts=body.prompt_parts()
    )
    return await serve_completion(request, runner, job, body.echo())


@router.post("/infill", response_model=None)
async def infill(
    body: InfillRequest, request: Request, catalog: CatalogDep, runner: RunnerDep
) -> Response:
    """Fill in the middle, with the model's FIM tokens (a 400 when it has none)."""
    model = await catalog.named_or_default(body.model)
    # Before anything about the model can show in an error.
    current_principal(request).require_model(model)
    config = catalog.registry.models.get(model)
    require_llama_cpp(
        config,
        model,
        "/infill",
        "POST /v1/completions with the model's fill-in-the-middle prompt written out",
    )
    body = await with_defaults(body, request, model)
    job = llama_job(request, body, model, config, "llama.infill", infill=body.infill())
    return await serve_completion(request, runner, job, body.echo())


async def _vocab(request: Request, catalog: Catalog, name: str | None) -> AnyVocab:
    model = await catalog.named_or_default(name)
    # No job runs here, so the key's model list is checked by hand.
    current_principal(request).require_model(model)
    vocabs: VocabCache = request.app.state.vocabs
    try:
        return await run_in_threadpool(vocabs.get, model, catalog.registry.models.get(model))
    except VocabUnavailable as exc:
        raise APIError(503, str(exc), code="vocab_unavailable") from exc


def _bad_token(token: int, vocab: AnyVocab, param: str) -> APIError:
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
