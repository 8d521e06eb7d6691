"""llama-server's /completion (and /infill) answers: one JSON object, or a
stream of `data: {"content", "stop": false}` chunks closed by a chunk with
`"stop": true` and every final field. No `[DONE]` line: llama-server sends
none on these endpoints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.errors import APIError, from_event
from api.openai.chunks import PING, sse
from api.streaming.jobs import ClientGone, JobRunner, JobStream, unless_disconnected
from schemas.events import Accepted, Done, ErrorEvent, Event, TokenEvent
from schemas.jobs import GenerateJob

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TOKEN_HEAD = b'data: {"index":0,"content":'
_TOKEN_TAIL = b',"stop":false}\n\n'


def timings(done: Done) -> dict[str, Any]:
    """llama-server's `timings`. Prompt time is measured by the engine; the
    generation time runs from the first token to the end."""
    cached = done.tokens_cached
    prompt_n = done.usage.prompt_tokens - cached
    prompt_ms = done.prompt_ms if done.prompt_ms is not None else (done.ttft_ms or 0.0)
    predicted_n = done.usage.completion_tokens
    predicted_ms = 0.0
    if done.ttft_ms is not None and predicted_n:
        predicted_ms = max(done.duration_ms - done.ttft_ms, 0.0)
    return {
        "cache_n": cached,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1000.0 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000.0 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
    }


def final_body(
    job: GenerateJob,
    accepted: Accepted | None,
    done: Done,
    echo: dict[str, Any],
    *,
    content: str,
    has_new_line: bool,
) -> dict[str, Any]:
    """The whole answer, or the last chunk of a stream (`content` empty: the
    text went out in the chunks before it)."""
    choice = done.choices[0]
    stop_type = choice.stop_type or "none"
    body: dict[str, Any] = {
        "index": 0,
        "content": content,
        "id_slot": -1 if choice.slot is None else choice.slot,
        "stop": True,
        "model": job.model,
        "tokens_predicted": done.usage.completion_tokens,
        "tokens_evaluated": done.usage.prompt_tokens,
        "generation_settings": {**((accepted and accepted.settings) or {}), **echo},
        "prompt": (accepted and accepted.prompt) or "",
        "has_new_line": has_new_line,
        # inferq rejects a prompt that does not fit (400) and stops at the
        # slot's context: nothing is ever truncated.
        "truncated": False,
        "stop_type": stop_type,
        # The flags llama-server sent before `stop_type`; clients still read them.
        "stopped_eos": stop_type == "eos",
        "stopped_word": stop_type == "word",
        "stopped_limit": stop_type == "limit",
        "stopping_word": choice.stopping_word or "",
        "tokens_cached": done.tokens_cached,
        "timings": timings(done),
    }
    if not job.stream and choice.logprobs is not None:
        body["completion_probabilities"] = choice.logprobs
    return body


async def _collect(stream: JobStream) -> tuple[Accepted | None, list[str], Done | ErrorEvent]:
    accepted: Accepted | None = None
    parts: list[str] = []
    while True:
        event = await stream.next()
        if isinstance(event, Accepted):
            accepted = event
        elif isinstance(event, TokenEvent):
            parts.append(event.text)
        elif isinstance(event, (Done, ErrorEvent)):
            return accepted, parts, event


async def _first(stream: JobStream) -> tuple[Accepted | None, Event | None]:
    """The Accepted event (kept for the last chunk) and the first event that
    decides the answer; None after the stream's ping interval of quiet."""
    accepted: Accepted | None = None
    while True:
        event = await stream.next(idle=stream.ping_interval)
        if not isinstance(event, Accepted):
            return accepted, event
        accepted = event


def _token_chunk(event: TokenEvent) -> bytes:
    if event.logprobs is None:
        # Hot path: the worker's JSON string literal is spliced in as it is.
        return _TOKEN_HEAD + event.text_json + _TOKEN_TAIL
    return sse(
        {
            "index": 0,
            "content": event.text,
            "stop": False,
            "completion_probabilities": event.logprobs,
        }
    )


async def serve_completion(
    request: Request, runner: JobRunner, job: GenerateJob, echo: dict[str, Any]
) -> Response:
    if not job.stream:
        try:
            async with runner.run(job) as stream:
                accepted, parts, result = await unless_disconnected(request, _collect(stream))
        except ClientGone:
            return Response(status_code=499)
        if isinstance(result, ErrorEvent):
            raise from_event(result)
        choice = result.choices[0]
        text = choice.text if choice.text is not None else "".join(parts)
        body = final_body(job, accepted, result, echo, content=text, has_new_line="\n" in text)
        return JSONResponse(body)

    stack, stream, (accepted, first) = await runner.open(request, job, _first)
    if isinstance(first, ErrorEvent):
        await stack.aclose()
        raise from_event(first)
    return StreamingResponse(
        _relay(stack, stream, job, accepted, first, echo),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _relay(
    stack: contextlib.AsyncExitStack,
    stream: JobStream,
    job: GenerateJob,
    accepted: Accepted | None,
    first: Event | None,
    echo: dict[str, Any],
) -> AsyncIterator[bytes]:
    async with stack:
        event: Event | None = first
        # JSON writes a newline inside a string as \n: no need to decode tokens.
        new_line = False
        if first is None:
            yield PING
        elif isinstance(first, TokenEvent):
            new_line = b"\\n" in first.text_json
            yield _token_chunk(first)
        while not isinstance(event, (Done, ErrorEvent)):
            try:
                event = await stream.next(idle=stream.ping_interval)
            except APIError as exc:
                event = ErrorEvent(exc.message, error_type=exc.type, code=exc.code)
            if event is None:
                yield PING
            elif isinstance(event, Accepted):
                accepted = event
            elif isinstance(event, TokenEvent):
                new_line = new_line or b"\\n" in event.text_json
                yield _token_chunk(event)
        if isinstance(event, ErrorEvent):
            error = {
                "message": event.message,
                "type": event.error_type,
                "param": event.param,
                "code": event.code,
            }
            yield sse({"error": error})
            return
        body = final_body(job, accepted, event, echo, content="", has_new_line=new_line)
        yield b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
