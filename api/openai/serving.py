"""Serving logic shared by /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.errors import APIError, from_event
from api.openai import bodies
from api.openai.bodies import Renderer
from api.openai.chunks import DONE, PING, ChunkFormat, sse
from api.streaming.jobs import ClientGone, JobRunner, JobStream, unless_disconnected
from api.openai.tools import ToolCallBuffer, parse_tool_call
from schemas.events import Done, ErrorEvent, Event, TokenEvent
from schemas.jobs import GenerateJob

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}


def _token_chunks(
    fmt: ChunkFormat, event: TokenEvent, offsets: list[int], tools: ToolCallBuffer | None
) -> list[bytes]:
    if tools is not None:
        if tools.feed(event.index, event.text):
            return []
        held = tools.undecided_prefix(event.index)
        if held:
            return [fmt.token(event.index, json.dumps(held + event.text).encode())]
    if event.logprobs is None:
        return [fmt.token(event.index, event.text_json)]
    chunk = fmt.token_logprobs(event, offsets[event.index])
    offsets[event.index] += sum(len(e["token"]) for e in event.logprobs)
    return [chunk]


def _error_chunk(event: ErrorEvent) -> bytes:
    return sse(
        {
            "error": {
                "message": event.message,
                "type": event.error_type,
                "param": event.param,
                "code": event.code,
            }
        }
    )


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
        try:
            async with runner.run(job) as stream:
                parts, result = await unless_disconnected(request, stream.collect())
        except ClientGone:
            return Response(status_code=499)
        if isinstance(result, ErrorEvent):
            raise from_event(result)
        return JSONResponse(render(job, created, parts, result))

    stack, stream, first = await runner.open(
        request, job, lambda s: s.first(patience=s.ping_interval)
    )
    if isinstance(first, ErrorEvent):
        await stack.aclose()
        raise from_event(first)
    fmt = ChunkFormat(
        request_id=job.request_id,
        model=job.model,
        created=created,
        chat=job.endpoint in ("chat.completions", "edits"),
        kind="generation.chunk" if job.endpoint.startswith("generate") else None,
    )
    return StreamingResponse(
        _relay(stack, stream, fmt, first, include_usage),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _relay(
    stack: contextlib.AsyncExitStack,
    stream: JobStream,
    fmt: ChunkFormat,
    first: Event | None,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    job = stream.job
    assert isinstance(job, GenerateJob)
    async with stack:
        n = job.sampling.n
        if fmt.chat:
            for index in range(n):
                yield fmt.role(index)
        offsets = [0] * n
        tools = ToolCallBuffer() if fmt.chat and job.tool_mode != "none" else None
        event: Any = first
        if first is None:
            yield PING
        elif isinstance(first, TokenEvent):
            for chunk in _token_chunks(fmt, first, offsets, tools):
                yield chunk
        while not isinstance(event, (Done, ErrorEvent)):
            try:
                event = await stream.next(idle=stream.ping_interval)
            except APIError as exc:
                event = ErrorEvent(exc.message, error_type=exc.type, code=exc.code)
            if event is None:
                yield PING
            elif isinstance(event, TokenEvent):
                for chunk in _token_chunks(fmt, event, offsets, tools):
                    yield chunk
        if isinstance(event, ErrorEvent):
            # Headers are gone already: the failure travels as an event.
            yield _error_chunk(event)
        else:
            for choice in event.choices:
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
            if include_usage:
                yield fmt.usage(event.usage)
        yield DONE
