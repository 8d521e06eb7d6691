"""Queue a job and follow its events: subscribe first, then enqueue, then
relay; cancel the job when the client goes away.

Bounds: until a worker accepts the job, `request_timeout` (a 504 after it).
Once accepted the job runs to its token budget: what ends it early is the
heartbeat watch (api/streaming/watch.py), when that worker dies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Request
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from api.accounts import limits
from api.accounts.principal import OPEN, Principal
from api.errors import APIError
from api.metrics import instruments
from api.streaming import backpressure
from api.streaming.hub import StreamHub, redis_unavailable
from api.streaming.watch import Tracked
from schemas import keys
from schemas.events import Accepted, Done, Embeddings, ErrorEvent, Event, TokenEvent, decode
from schemas.jobs import EmbedJob, GenerateJob
from schemas.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _timed_out() -> APIError:
    return APIError(504, "the request timed out waiting for a worker")


@dataclass
class JobStream:
    """The live event stream of one queued job."""

    job: GenerateJob | EmbedJob
    queue: asyncio.Queue[bytes]
    tracked: Tracked
    finished: bool = False
    # Until a worker accepts the job (monotonic).
    deadline: float = field(default=0.0)
    ping_interval: float = 15.0
    # The id the job runs under now: the job's own, or the id of the copy
    # queued again after its worker died (see JobRunner._requeue).
    request_id: str = ""
    attempt_channels: list[bytes] = field(default_factory=list)
    # The job's place in its model's backpressure count, until accepted.
    ticket: backpressure.Ticket | None = None
    # For api/metrics: when it was queued and its first token came
    # (monotonic), the terminal event, and whether the client left first.
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    end: Event | None = None
    left: bool = False

    async def next(self, *, idle: float | None = None) -> Event | None:
        """The next event; None when `idle` seconds pass without one."""
        wait = idle
        if self.tracked.worker_id is None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out()
            wait = remaining if idle is None else min(idle, remaining)
        try:
            raw = await asyncio.wait_for(self.queue.get(), timeout=wait)
        except TimeoutError:
            if idle is not None and wait == idle:
                return None
            raise _timed_out() from None
        event = decode(raw)
        if isinstance(event, TokenEvent):
            if not self.tracked.progressed:
                self.first_token_at = time.monotonic()
            self.tracked.progressed = True
        elif isinstance(event, Accepted):
            # From here the worker's heartbeat, not request_timeout, bounds it.
            if event.worker_id:
                self.tracked.worker_id = event.worker_id
            if self.ticket is not None:
                self.ticket.release()
        elif isinstance(event, (Done, ErrorEvent, Embeddings)):
            if isinstance(event, Done):
                backpressure.JOB_TIMES.observe(self.job.model, event.duration_ms / 1000)
            self.finished = True
            self.tracked.ended = True
            self.end = event
        return event

    async def first(self, *, patience: float) -> tuple[Accepted | None, Event | None]:
        """The first event that decides the response: an error (sent as an HTTP
        error), or a token or the end (a 200 stream); with the Accepted event
        before it, if any. None when `patience` seconds pass first: the stream
        then starts with pings. Not answering before that keeps the API off the
        CPU while the prompt is evaluated."""
        accepted: Accepted | None = None
        while True:
            event = await self.next(idle=patience)
            if not isinstance(event, Accepted):
                return accepted, event
            accepted = event


@dataclass
class JobRunner:
    settings: Settings
    redis: aioredis.Redis
    hub: StreamHub
    celery: Celery
    # Who the jobs are run for: their model must be one the key may use, and
    # they are charged to it.
    principal: Principal = OPEN
    # The request's state: admission leaves the x-ratelimit-* headers there.
    request_state: Any = None

    async def _enqueue(self, job: GenerateJob | EmbedJob, *, expires: float | None = None) -> None:
        task = keys.TASK_EMBED if isinstance(job, EmbedJob) else keys.TASK_GENERATE

        def send() -> None:
            self.celery.send_task(
                task,
                args=[job.model_dump(mode="json")],
                queue=keys.model_queue(job.model),
                # A job nobody waits for any more is dropped, not run.
                expires=expires if expires is not None else self.settings.request_timeout,
            )

        try:
            await run_in_threadpool(send)
        except (OperationalError, RedisError, OSError) as exc:
            # Redis down: kombu's bounded retries are spent (schemas/queue.py).
            raise redis_unavailable(exc) from exc

    async def cancel(self, job: GenerateJob | EmbedJob, request_id: str | None = None) -> None:
        await self._mark_cancelled(job.model, request_id or job.request_id, b"1")

    async def _mark_cancelled(self, model: str, request_id: str, value: bytes) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(
                    keys.cancel_key(request_id),
                    value,
                    ex=max(1, math.ceil(self.settings.request_timeout)),
                )
                pipe.publish(keys.cancel_channel(model), request_id)
                await pipe.execute()
        except Exception as exc:
            # Redis down: the worker notices no one listens and stops it then.
            log.warning("could not cancel %s: %s", request_id, exc)

    @contextlib.asynccontextmanager
    async def run(self, job: GenerateJob | EmbedJob) -> AsyncIterator[JobStream]:
        self.principal.require_model(job.model)
        # A model without a live worker: a 503 now, not a wait for the timeout.
        await self.hub.watch.require_worker(job.model)
        # The key's rate limits (a 429 here enqueues nothing); the account
        # carries the reservation the worker settles.
        job.account = await limits.admit(self.redis, self.principal, job, self.request_state)
        async with self.hub.subscribe(keys.stream_channel(job.request_id)) as queue:
            if isinstance(job, GenerateJob):
                job.enqueued_at = time.time()
            started = time.monotonic()
            try:
                ticket = await backpressure.admit(self.redis, self.settings, job.model)
            except BaseException:
                await limits.refund(self.redis, self.principal, job)
                raise
            try:
                await self._enqueue(job)
            except BaseException:
                ticket.release()
                await limits.refund(self.redis, self.principal, job)
                raise
            stream = JobStream(
                job,
                queue,
                Tracked(job.model, queue, requeue=lambda: self._requeue(stream)),
                deadline=time.monotonic() + self.settings.request_timeout,
                ping_interval=self.settings.sse_ping_interval,
                request_id=job.request_id,
                ticket=ticket,
                started=started,
            )
            self.hub.watch.add(stream.tracked)
            try:
                yield stream
            except BaseException as exc:
                stream.left = _client_left(exc)
                raise
            finally:
                ticket.release()
                self.hub.watch.discard(stream.tracked)
                for channel in stream.attempt_channels:
                    self.hub.detach(channel)
                if not stream.finished or stream.tracked.abandoned:
                    # The client left (or timed out) before the end, or the API
                    # ended the stream itself (worker lost, Redis gone).
                    self.hub.spawn(self.cancel(job, stream.request_id))
                instruments.job_ended(stream)

    async def _requeue(self, stream: JobStream) -> bool:
        """Queue the job again under a new id because its worker died before
        sending the client anything. The old id is detached first (a late
        event of it can never reach this stream) and its cancel key set, so a
        copy of it still queued, or redelivered by Celery, is dropped."""
        tracked, job = stream.tracked, stream.job
        if tracked.ended:
            return True
        old = stream.request_id
        new = f"{job.request_id}.{tracked.requeues + 1}"
        old_channel = keys.stream_channel(old).encode()
        new_channel = keys.stream_channel(new).encode()
        self.hub.detach(old_channel)
        await self.hub.attach(new_channel, stream.queue)
        stream.attempt_channels.append(new_channel)
        await self._mark_cancelled(job.model, old, keys.CANCEL_REQUEUED)
        retry = job.model_copy(update={"request_id": new})
        if isinstance(retry, GenerateJob):
            retry.enqueued_at = time.time()
        await self._enqueue(retry)
        tracked.requeues += 1
        tracked.worker_id = None
        stream.request_id = new
        stream.deadline = time.monotonic() + self.settings.request_timeout
        log.warning(
            "queued %s again as %s: its worker died before the client got a token", old, new
        )
        return True

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
        except BaseException as exc:
            stream.left = _client_left(exc)
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


def _client_left(exc: BaseException) -> bool:
    # A stream closed under the relay (GeneratorExit) or cancelled with the
    # request's task: the client went away.
    return isinstance(exc, (ClientGone, asyncio.CancelledError, GeneratorExit))


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
