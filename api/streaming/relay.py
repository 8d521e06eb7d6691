"""Relay a queued job to its client: as a stream of server-sent events, or
collected into one answer. Every family answers through here, so the error
envelope, the pings and the 499 of a client gone are written once.

A family says how its stream looks with a small `StreamFormat`; the loop that
waits for events, pings while the engine is quiet and turns a failure into an
error event is shared."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from api.errors import APIError, from_event
from api.streaming.jobs import ClientGone, JobRunner, JobStream, unless_disconnected
from schemas.events import Accepted, Done, Embeddings, ErrorEvent, Event, TokenEvent, error_body
from schemas.jobs import EmbedJob, GenerateJob

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"

End = TypeVar("End", Done, Embeddings)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def error_chunk(event: ErrorEvent) -> bytes:
    """A failure once the headers are gone: it travels as an event."""
    return sse(error_body(event.message, type=event.error_type, code=event.code, param=event.param))


def event_stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


class StreamFormat(Protocol):
    """How one family writes a relayed job. `token` is the hot path: it should
    splice `event.text_json` into fixed bytes, not build or parse JSON."""

    # Whether a `data: [DONE]` line closes the stream (after the end or an error).
    closes_with_done: bool

    def start(self) -> Iterable[bytes]:
        """What goes out before the first event (OpenAI's role chunks)."""
        ...

    def accepted(self, event: Accepted) -> None:
        """A worker admitted the job (llama-server echoes its settings at the end)."""
        ...

    def token(self, event: TokenEvent) -> bytes | None:
        """The chunk of one token; None to hold it back (a tool call forming)."""
        ...

    def end(self, done: Done) -> Iterable[bytes]:
        """The chunks after the last token."""
        ...


async def _decide(stream: JobStream) -> tuple[Accepted | None, Event | None]:
    return await stream.first(patience=stream.ping_interval)


async def relay(
    request: Request, runner: JobRunner, job: GenerateJob, fmt: StreamFormat
) -> Response:
    """Queue `job` and answer as a stream, once the first event says it runs: a
    failure before then is an HTTP error, with its status."""
    stack, stream, (accepted, first) = await runner.open(request, job, _decide)
    if isinstance(first, ErrorEvent):
        await stack.aclose()
        raise from_event(first)
    if accepted is not None:
        fmt.accepted(accepted)
    return event_stream(_relay(stack, stream, fmt, first))


async def _relay(
    stack: contextlib.AsyncExitStack, stream: JobStream, fmt: StreamFormat, first: Event | None
) -> AsyncIterator[bytes]:
    async with stack:
        for head in fmt.start():
            yield head
        event: Event | None = first
        while not isinstance(event, (Done, ErrorEvent)):
            if event is None:
                yield PING
            elif isinstance(event, TokenEvent):
                chunk = fmt.token(event)
                if chunk is not None:
                    yield chunk
            elif isinstance(event, Accepted):
                fmt.accepted(event)
            try:
                event = await stream.next(idle=stream.ping_interval)
            except APIError as exc:
                event = ErrorEvent(exc.message, error_type=exc.type, code=exc.code)
        if isinstance(event, ErrorEvent):
            yield error_chunk(event)
        else:
            for tail in fmt.end(event):
                yield tail
        if fmt.closes_with_done:
            yield DONE


@dataclass
class Collected(Generic[End]):
    """A job's whole answer: its last event, the text of each choice and the
    Accepted event (llama-server echoes its settings)."""

    end: End
    parts: dict[int, list[str]] = field(default_factory=dict)
    accepted: Accepted | None = None

    def text(self, index: int = 0) -> str:
        return "".join(self.parts.get(index, ()))


async def _collect(stream: JobStream) -> Collected[Any] | ErrorEvent:
    parts: dict[int, list[str]] = {}
    accepted: Accepted | None = None
    while True:
        event = await stream.next()
        if isinstance(event, TokenEvent):
            parts.setdefault(event.index, []).append(event.text)
        elif isinstance(event, Accepted):
            accepted = event
        elif isinstance(event, ErrorEvent):
            return event
        elif event is not None:
            return Collected(event, parts, accepted)


@overload
async def collect(
    request: Request,
    runner: JobRunner,
    job: GenerateJob,
    render: Callable[[Collected[Done]], Response],
) -> Response: ...


@overload
async def collect(
    request: Request,
    runner: JobRunner,
    job: EmbedJob,
    render: Callable[[Collected[Embeddings]], Response],
) -> Response: ...


async def collect(
    request: Request,
    runner: JobRunner,
    job: GenerateJob | EmbedJob,
    render: Callable[[Collected[Any]], Response],
) -> Response:
    """Queue `job`, wait for its end and answer with `render`: a 499 when the
    client leaves first, the HTTP error of the worker's error event."""
    try:
        async with runner.run(job) as stream:
            result = await unless_disconnected(request, _collect(stream))
    except ClientGone:
        return Response(status_code=499)
    if isinstance(result, ErrorEvent):
        raise from_event(result)
    return render(result)
