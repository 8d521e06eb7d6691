"""Serving logic shared by /v1/chat/completions, /v1/completions, /v1/edits
and /v1/generate: one JSON body, or OpenAI's chunks closed by `[DONE]`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.openai import bodies
from api.openai.bodies import Renderer
from api.openai.chunks import ChunkFormat
from api.openai.tools import ToolCallBuffer, parse_tool_call
from api.streaming import relay
from api.streaming.jobs import JobRunner
from schemas.events import Accepted, Done, TokenEvent
from schemas.jobs import GenerateJob


class OpenAIStream:
    """The relay's format for OpenAI's chunks: role chunks first (chat), a
    tool call held back until it is whole, finish chunks, usage if asked."""

    closes_with_done = True

    def __init__(self, fmt: ChunkFormat, job: GenerateJob, *, include_usage: bool) -> None:
        self.fmt = fmt
        self.n = job.sampling.n
        self.include_usage = include_usage
        self.offsets = [0] * self.n
        self.tools = ToolCallBuffer() if fmt.chat and job.tool_mode != "none" else None

    def start(self) -> Iterator[bytes]:
        if self.fmt.chat:
            for index in range(self.n):
                yield self.fmt.role(index)

    def accepted(self, event: Accepted) -> None:
        pass

    def token(self, event: TokenEvent) -> bytes | None:
        fmt, tools = self.fmt, self.tools
        if tools is not None:
            if tools.feed(event.index, event.text):
                return None
            held = tools.undecided_prefix(event.index)
            if held:
                return fmt.token(event.index, json.dumps(held + event.text).encode())
        if event.logprobs is None:
            return fmt.token(event.index, event.text_json)
        chunk = fmt.token_logprobs(event, self.offsets[event.index])
        self.offsets[event.index] += sum(len(e["token"]) for e in event.logprobs)
        return chunk

    def end(self, done: Done) -> Iterator[bytes]:
        fmt, tools = self.fmt, self.tools
        for choice in done.choices:
            reason = choice.finish_reason
            held = tools.held_text(choice.index) if tools else ""
            if held:
                call = parse_tool_call(held)
                if call is not None:
                    yield fmt.tool_call(choice.index, call)
                    reason = "tool_calls"
                else:
                    yield fmt.token(choice.index, json.dumps(held).encode())
            yield fmt.finish(choice.index, reason)
        if self.include_usage:
            yield fmt.usage(done.usage, done.tokens_cached)


async def serve(
    request: Request,
    runner: JobRunner,
    job: GenerateJob,
    *,
    include_usage: bool,
    render: Renderer = bodies.openai_body,
) -> Response:
    created = int(time.time())
    if not job.stream:
        return await relay.collect(
            request,
            runner,
            job,
            lambda answer: JSONResponse(render(job, created, answer.parts, answer.end)),
        )
    fmt = ChunkFormat(
        request_id=job.request_id,
        model=job.model,
        created=created,
        chat=job.endpoint in ("chat.completions", "edits"),
        kind="generation.chunk" if job.endpoint.startswith("generate") else None,
    )
    return await relay.relay(
        request, runner, job, OpenAIStream(fmt, job, include_usage=include_usage)
    )
