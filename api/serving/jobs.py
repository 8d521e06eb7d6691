"""Queue a job and follow its events: subscribe first, then enqueue, then
relay; cancel the job when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api.errors import APIError
from api.hub import StreamHub
from schemas import keys
from schemas.events import Accepted, Done, Embeddings, ErrorEvent, Event, TokenEvent, decode
from schemas.jobs import EmbedJob, GenerateJob
from schemas.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class JobStream:
    """The live event stream of one queued job."""

    job: GenerateJob | EmbedJob
    queue: asyncio.Queue[bytes]
    finished: bool = False
    deadline: float = field(default=0.0)
    ping_interval: float = 15.0

    async def next(self, *, idle: float | None = None) -> Event | None:
        """The next event; None when `idle` seconds pass without one."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise APIError(504, "the request timed out waiting for a worker")
        wait = remaining if idle is None else min(idle, remaining)
        try:
            raw = await asyncio.wait_for(self.queue.get(), timeout=wait)
        except TimeoutError:
            if idle is not None and wait == idle:
                return None
            raise APIError(504, "the request timed out waiting for a worker") from None
        event = decode(raw)
        if isinstance(event, (Done, ErrorEvent, Embeddings)):
            self.finished = True
        return event

    async def first(self, *, patience: float) -> Event | None:
        """The first event that decides the response: an error (sent as an HTTP
        error), or a token or the end (a 200 stream). None when `patience`
        seconds pass first: the stream then starts with pings. Not answering
        before that keeps the API off the CPU while the prompt is evaluated."""
        while True:
            event = await self.next(idle=patience)
            if not isinstance(event, Accepted):
                return event

    async def collect(self) -> tuple[dict[int, list[str]], Done | ErrorEvent]:
        parts: dict[int, list[str]] = {}
        while True:
            event = await self.next()
            if isinstance(event, TokenEvent):
                parts.setdefault(event.index, []).append(event.text)
            elif isinstance(event, (Done, ErrorEvent)):
                return parts, event


@dataclass
class JobRunner:
    settings: Settings
    redis: aioredis.Redis
    hub: StreamHub
    celery: Celery

    async def _enqueue(self, job: GenerateJob | EmbedJob) -> None:
        task = keys.TASK_EMBED if isinstance(job, EmbedJob) else keys.TASK_GENERATE

        def send() -> None:
            self.celery.send_task(
                task,
                args=[job.model_dump(mode="json")],
                queue=keys.model_queue(job.model),
                # A job nobody waits for any more is dropped, not run.
                expires=self.settings.request_timeout,
            )

        await run_in_threadpool(send)

    async def cancel(self, job: GenerateJob | EmbedJob) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(
                    keys.cancel_key(job.request_id),
                    1,
                    ex=max(1, math.ceil(self.settings.request_timeout)),
                )
                pipe.publish(keys.cancel_channel(job.model), job.request_id)
                await pipe.execute()
        except Exception:
            log.exception("could not cancel %s", job.request_id)

    @contextlib.asynccontextmanager
    async def run(self, job: GenerateJob | EmbedJob) -> AsyncIterator[JobStream]:
        async with self.hub.subscribe(keys.stream_channel(job.request_id)) as queue:
            if isinstance(job, GenerateJob):
                job.enqueued_at = time.time()
            await self._enqueue(job)
            stream = JobStream(
                job,
                queue,
                deadline=time.monotonic() + self.settings.request_timeout,
                ping_interval=self.settings.sse_ping_interval,
            )
            try:
                yield stream
            finally:
                if not stream.finished:
                    # The client left (or timed out) before the end.
                    self.hub.spawn(self.cancel(job))

    async def open(
        self, request: Request, job: GenerateJob, decide: Callable[[JobStream], Awaitable[T]]
    ) -> tuple[contextlib.AsyncExitStack, JobStream, T]:
        """Queue `job` and wait for what decides the response (`decide`), for a
        streamed answer: the stream stays open in the returned stack, which the
        response body closes; it is closed here if the wait fails."""
        stack = contextlib.AsyncExitStack()
        stream = await stack.enter_async_context(self.run(job))
        try:
            decided = await unless_disconnected(request, decide(stream))
        except BaseException:
            await stack.aclose()
            raise
        return stack, stream, decided


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (no polling: it waits on
    the ASGI receive channel, which the body has already been read from)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, abandoning it (ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
