"""llama-server requests -> the jobs workers run: the defaults POST /props
stored filled in, then the same limits as every generation job."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.errors import bad_request
from api.llama.common import load_overrides
from api.llama.protocol import LlamaOptions
from api.streaming.jobs import new_request_id
from api.streaming.limits import check_generate
from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig
from schemas.sampling import SamplingOptions

Body = TypeVar("Body", bound=LlamaOptions)


def _invalid(exc: ValidationError) -> RequestValidationError:
    # Answered as any other bad request body: a 400 in the error envelope.
    return RequestValidationError(exc.errors(include_url=False))


async def with_defaults(body: Body, request: Request, model: str) -> Body:
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


def llama_job(
    request: Request,
    body: LlamaOptions,
    model: str,
    config: ModelConfig | None,
    endpoint: str,
    **fields: Any,
) -> GenerateJob:
    """The job of /completion (`prompt_parts`) or /infill (`infill`)."""
    sampling = _sampling(body)
    with bad_request():
        job = GenerateJob(
            request_id=new_request_id("llamacmpl"),
            model=model,
            endpoint=endpoint,  # type: ignore[arg-type]
            sampling=sampling,
            stream=body.stream,
            id_slot=None if body.id_slot < 0 else body.id_slot,
            **fields,
        )
    return check_generate(job, config, request.app.state.settings)
