"""OpenAI requests -> the jobs workers run. Shared by the HTTP routers and by
bulk-job validation, so a batch line runs exactly what the same request sent
on its own would."""

from __future__ import annotations

from api.errors import bad_request
from api.openai.protocol import ChatCompletionRequest, CompletionRequest, EditRequest
from api.streaming.jobs import new_request_id
from api.streaming.limits import check_generate
from schemas.jobs import GenerateJob, Message
from schemas.registry import ModelConfig
from schemas.settings import Settings


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


def edit_job(
    body: EditRequest,
    model: str,
    config: ModelConfig | None = None,
    settings: Settings | None = None,
) -> GenerateJob:
    """The legacy edits API: `instruction` applied to `input`, through the
    model's chat template."""
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
    return check_generate(job, config, settings)
