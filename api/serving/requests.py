"""OpenAI requests -> the jobs workers run. Shared by the HTTP routers and by
bulk-job validation, so a batch line runs exactly what the same request sent
on its own would."""

from __future__ import annotations

import uuid

from api.errors import APIError
from schemas.embeddings import EmbeddingRequest, RerankRequest
from schemas.jobs import EmbedJob, GenerateJob
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.registry import ModelConfig


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_job(body: ChatCompletionRequest, model: str) -> GenerateJob:
    tools, tool_mode, tool_names = body.tool_settings()
    return GenerateJob(
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


def completion_job(body: CompletionRequest, model: str) -> GenerateJob:
    return GenerateJob(
        request_id=new_request_id("cmpl"),
        model=model,
        endpoint="completions",
        prompt=body.prompt_text(),
        sampling=body.sampling(),
        stream=body.stream,
    )


def embedding_job(body: EmbeddingRequest, model: str, config: ModelConfig | None) -> EmbedJob:
    """The job; a 400 when `dimensions` asks a model that cannot shorten."""
    if body.dimensions is not None and config is not None and not config.matryoshka:
        raise APIError(
            400,
            f"model '{model}' cannot shorten its embeddings (not a Matryoshka model)",
            param="dimensions",
        )
    return EmbedJob(
        request_id=new_request_id("embd"), model=model, inputs=body.items(), truncate=body.truncate
    )


def rerank_job(body: RerankRequest, model: str) -> EmbedJob:
    return EmbedJob(
        request_id=new_request_id("rerank"),
        model=model,
        kind="rerank",
        query=body.query,
        documents=body.texts(),
        truncate=body.truncate,
    )
