"""Serving logic shared by /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.errors import APIError
from api.serving import logprobs
from api.serving.chunks import DONE, PING, ChunkFormat, sse, usage_dict
from api.serving.jobs import ClientGone, JobRunner, JobStream, unless_disconnected
from schemas.events import Done, ErrorEvent, Event, TokenEvent
from schemas.jobs import GenerateJob

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}
# A comment line keeps proxies and clients from timing out a quiet stream.
PING_INTERVAL = 15.0


def _token_chunk(fmt: ChunkFormat, event: TokenEvent, offsets: list[int]) -> bytes:
    if event.logprobs is None:
        return fmt.token(event.index, event.text_json)
    chunk = fmt.token_logprobs(event, offsets[event.index])
    offsets[event.index] += sum(len(e["token"]) for e in event.logprobs)
    return chunk


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _error(event: ErrorEvent) -> APIError:
    return APIError(
        event.status,
        event.message,
        code=event.code,
        type=event.error_type,
        param=event.param,
    )


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


def _body(
    job: GenerateJob, created: int, parts: dict[int, list[str]], done: Done
) -> dict[str, Any]:
    chat = job.endpoint == "chat.completions"
    choices: list[dict[str, Any]] = []
    for result in done.choices:
        text = result.text if result.text is not None else "".join(parts.get(result.index, []))
        lp = None
        if result.logprobs is not None:
            lp = logprobs.chat(result.logprobs) if chat else logprobs.completion(result.logprobs)
        if chat:
            choices.append(
                {
                    "index": result.index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": result.finish_reason,
                }
            )
        else:
            choices.append(
                {
                    "index": result.index,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": result.finish_reason,
                }
            )
    return {
        "id": job.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": job.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_dict(done.usage),
    }


async def serve(
    request: Request, runner: JobRunner, job: GenerateJob, *, include_usage: bool
) -> Response:
    created = int(time.time())
    if not job.stream:
        try:
            async with runner.run(job) as stream:
                parts, result = await unless_disconnected(request, stream.collect())
        except ClientGone:
            return Response(status_code=499)
        if isinstance(result, ErrorEvent):
            raise _error(result)
        return JSONResponse(_body(job, created, parts, result))

    stack = contextlib.AsyncExitStack()
    stream = await stack.enter_async_context(runner.run(job))
    try:
        first = await unless_disconnected(request, stream.first(patience=PING_INTERVAL))
    except BaseException:
        await stack.aclose()
        raise
    if isinstance(first, ErrorEvent):
        await stack.aclose()
        raise _error(first)
    fmt = ChunkFormat(
        request_id=job.request_id,
        model=job.model,
        created=created,
        chat=job.endpoint == "chat.completions",
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
    async with stack:
        n = stream.job.sampling.n
        if fmt.chat:
            for index in range(n):
                yield fmt.role(index)
        offsets = [0] * n
        event: Any = first
        if first is None:
            yield PING
        elif isinstance(first, TokenEvent):
            yield _token_chunk(fmt, first, offsets)
        while not isinstance(event, (Done, ErrorEvent)):
            try:
                event = await stream.next(idle=PING_INTERVAL)
            except APIError as exc:
                event = ErrorEvent(exc.message, error_type=exc.type, code=exc.code)
            if event is None:
                yield PING
            elif isinstance(event, TokenEvent):
                yield _token_chunk(fmt, event, offsets)
        if isinstance(event, ErrorEvent):
            # Headers are gone already: the failure travels as an event.
            yield _error_chunk(event)
        else:
            for choice in event.choices:
                yield fmt.finish(choice.index, choice.finish_reason)
            if include_usage:
                yield fmt.usage(event.usage)
        yield DONE
