"""OpenAI requests -> the jobs workers run. Shared by the HTTP routers and by
bulk-job validation, so a batch line runs exactly what the same request sent
on its own would."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from pydantic import ValidationError

from api.errors import APIError, describe_validation
from api.embeddings.protocol import EmbeddingRequest, RerankRequest
from schemas.jobs import EmbedJob, GenerateJob
from api.openai.protocol import ChatCompletionRequest, CompletionRequest
from schemas.registry import ModelConfig
from schemas.settings import Settings, get_settings


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _limits(settings: Settings | None) -> Settings:
    return settings if settings is not None else get_settings()


def check_generate(
    job: GenerateJob, config: ModelConfig | None, settings: Settings | None = None
) -> GenerateJob:
    """The per-request limits (settings) and what the model's config already
    says: a 400 now instead of a queued job its worker would refuse."""
    limits = _limits(settings)
    stop = job.sampling.stop
    if len(stop) > limits.max_stop:
        raise APIError(
            400, f"at most {limits.max_stop} stop sequences (INFERQ_MAX_STOP)", param="stop"
        )
    if any(len(s) > limits.max_stop_length for s in stop):
        raise APIError(
            400,
            f"a stop sequence may hold at most {limits.max_stop_length} characters "
            "(INFERQ_MAX_STOP_LENGTH)",
            param="stop",
        )
    if job.messages is not None and len(job.messages) > limits.max_messages:
        raise APIError(
            400, f"at most {limits.max_messages} messages (INFERQ_MAX_MESSAGES)", param="messages"
        )
    if config is None:
        return job
    width = job.beam.width if job.beam is not None else job.sampling.n
    if width > config.parallel:
        raise APIError(
            400,
            f"n={width} needs {width} parallel slots; this model has {config.parallel} "
            "(its `parallel` setting)",
            param="n",
        )
    limit = job.sampling.max_tokens
    if limit is not None and limit > config.context_size:
        # The worker's own answer for a prompt plus max_tokens that cannot fit.
        raise APIError(
            400,
            f"max_tokens {limit} is more than the {config.context_size} tokens of context "
            f"a request of model '{job.model}' has",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return job


@contextlib.contextmanager
def bad_request() -> Iterator[None]:
    """Job fields are checked again as the job is built: a value a request
    schema let through but the job refuses is still a 400, never a 500."""
    try:
        yield
    except ValidationError as exc:
        message, param = describe_validation(list(exc.errors()))
        raise APIError(400, message, param=param) from None


def chat_job(
    body: ChatCompletionRequest,
    model: str,
    config: ModelConfig | None = None,
    settings: Settings | None = None,
) -> GenerateJob:
    with bad_request():
        tools, tool_mode, tool_names = body.tool_settings()
        job = GenerateJob(
            request_id=new_request_id("chatcmpl"),
            model=model,
            endpoint="chat.completions",
            messages=[m.flatten() for m in body.messages],
            sampling=body.sampling(),
            stream=body.stream,
            tools=tools,
            tool_mode=tool_mode,
            tool_names=tool_names,
        )
    return check_generate(job, config, settings)


def completion_job(
    body: CompletionRequest,
    model: str,
    config: ModelConfig | None = None,
    settings: Settings | None = None,
) -> GenerateJob:
    with bad_request():
        job = GenerateJob(
            request_id=new_request_id("cmpl"),
            model=model,
            endpoint="completions",
            prompt=body.prompt_text(),
            sampling=body.sampling(),
            stream=body.stream,
        )
    return check_generate(job, config, settings)


def check_inputs(count: int, param: str, settings: Settings | None = None) -> None:
    limit = _limits(settings).max_embedding_inputs
    if count > limit:
        raise APIError(
            400, f"at most {limit} inputs per request (INFERQ_MAX_EMBEDDING_INPUTS)", param=param
        )


def embedding_job(body: EmbeddingRequest, model: str, config: ModelConfig | None) -> EmbedJob:
    """The job; a 400 when `dimensions` asks a model that cannot shorten."""
    check_inputs(len(body.items()), "input")
    if body.dimensions is not None and config is not None and not config.matryoshka:
        raise APIError(
            400,
            f"model '{model}' cannot shorten its embeddings (not a Matryoshka model)",
            param="dimensions",
        )
    with bad_request():
        return EmbedJob(
            request_id=new_request_id("embd"),
            model=model,
            inputs=body.items(),
            truncate=body.truncate,
        )


def rerank_job(body: RerankRequest, model: str) -> EmbedJob:
    check_inputs(len(body.documents), "documents")
    with bad_request():
        return EmbedJob(
            request_id=new_request_id("rerank"),
            model=model,
            kind="rerank",
            query=body.query,
            documents=body.texts(),
            truncate=body.truncate,
        )
