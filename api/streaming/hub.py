"""One pub/sub connection per API process, shared by every open request.

A request subscribes to its own channel and waits for Redis to confirm the
subscription before its job is queued: pub/sub is at-most-once, and an event
published before the subscription exists would be lost.

For the same reason a dropped connection ends every open request: whatever
was published while it was down is gone, so those streams end with a 503
error event instead of waiting for events that will never come. redis-py
reconnects (and subscribes again) on the next read; the hub knows it happened
when Redis confirms its anchor channel a second time. While the connection is
down, new requests get a 503 at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from api.errors import APIError
from api.streaming.watch import WorkerWatch, lost_event, unavailable
from schemas.settings import Settings

log = logging.getLogger(__name__)


def redis_unavailable(detail: object = None) -> APIError:
    suffix = f" ({detail})" if detail else ""
    return unavailable(f"Redis is unavailable{suffix}; retry shortly", "redis_unavailable")


def install_redis_errors(app: FastAPI) -> None:
    """Redis failing anywhere in a request (model lookup, props, enqueue) is a
    503 in the envelope, not a 500."""

    async def handler(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return redis_unavailable(exc).response()

    app.add_exception_handler(RedisError, handler)
    app.add_exception_handler(OperationalError, handler)


class StreamHub:
    def __init__(self, client: aioredis.Redis, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self._client = client
        self._pubsub = client.pubsub()
        self._queues: dict[bytes, asyncio.Queue[bytes]] = {}
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._timeout = settings.redis_timeout
        # A channel of our own keeps the connection subscribed (and the reader
        # running) while no request is open; its confirmations mark (re)connects.
        self._anchor = f"inferq:api:{uuid.uuid4().hex}".encode()
        self._anchored = False
        self.connected = False
        self.watch = WorkerWatch(
            client, interval=settings.heartbeat_interval, grace=settings.worker_start_grace
        )

    async def start(self) -> None:
        await self._subscribe(self._anchor, start_reader=True)
        self.connected = True
        self.watch.start()

    async def close(self) -> None:
        await self.watch.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _subscribe(self, channel: bytes, *, start_reader: bool = False) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirm[channel] = confirmed
        try:
            await self._pubsub.subscribe(channel)
            if start_reader:
                self._reader = asyncio.create_task(self._read(), name="pubsub-reader")
            await asyncio.wait_for(confirmed, timeout=self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_unavailable(exc or "no confirmation") from exc
        finally:
            self._confirm.pop(channel, None)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        key = channel.encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        await self.attach(key, queue)
        try:
            yield queue
        finally:
            self.detach(key)

    async def attach(self, key: bytes, queue: asyncio.Queue[bytes]) -> None:
        """Route `key`'s events into `queue` once Redis confirms it (503 if
        Redis is down). A request queued again under a new id attaches its new
        channel to the queue it already reads."""
        if not self.connected:
            raise redis_unavailable("the pub/sub connection is down")
        self._queues[key] = queue
        try:
            await self._subscribe(key)
        except BaseException:
            self.detach(key)
            raise

    def detach(self, key: bytes) -> None:
        """Stop routing `key`; its events are dropped from now on."""
        self._queues.pop(key, None)
        if self.connected:
            # Not awaited here: this runs while the request may be cancelled
            # (client gone), and a cancelled await would skip the unsubscribe.
            # While disconnected only the reader touches the connection; the
            # channel is dropped once it is back (_restored).
            self.spawn(self._unsubscribe(key))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` to completion even if the caller is being cancelled."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unsubscribe(self, key: bytes) -> None:
        try:
            await self._pubsub.unsubscribe(key)
        except Exception as exc:
            log.warning("unsubscribe from %r failed: %s", key, exc)

    def _dropped(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("pub/sub connection to Redis lost (%s); ending open streams", exc)
        self.connected = False
        self._end_open_streams()
        for future in self._confirm.values():
            if not future.done():
                future.set_exception(ConnectionError("the pub/sub connection dropped"))

    def _end_open_streams(self) -> None:
        self.watch.fail_all(
            lost_event(
                "the connection to Redis dropped: events of this request may have been lost",
                "redis_unavailable",
            )
        )

    def _restored(self) -> None:
        if self._anchored:
            # Confirmed again: redis-py reconnected, maybe without an error
            # surfacing (it retries reads). Anything published meanwhile is lost.
            log.warning("pub/sub connection to Redis re-established")
            self._end_open_streams()
        self._anchored = True
        self.connected = True
        # Channels whose requests ended while the connection was down were
        # subscribed again by the reconnect: drop them now.
        for channel in list(self._pubsub.channels):
            key = channel if isinstance(channel, bytes) else str(channel).encode()
            if key != self._anchor and key not in self._queues and key not in self._confirm:
                self.spawn(self._unsubscribe(key))

    async def _read(self) -> None:
        while True:
            try:
                # A bounded read, so redis-py's health checks run on idle
                # connections too.
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._dropped(exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if kind == "message":
                queue = self._queues.get(channel)
                if queue is not None:
                    queue.put_nowait(message["data"])
            elif kind == "subscribe":
                if channel == self._anchor:
                    self._restored()
                future = self._confirm.get(channel)
                if future is not None and not future.done():
                    future.set_result(None)
