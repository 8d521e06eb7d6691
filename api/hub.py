"""One pub/sub connection per API process, shared by every open request.

A request subscribes to its own channel and waits for Redis to confirm the
subscription before its job is queued: pub/sub is at-most-once, and an event
published before the subscription exists would be lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger(__name__)


class StreamHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._queues: dict[bytes, asyncio.Queue[bytes]] = {}
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # A channel of our own keeps the connection subscribed (and the reader
        # running) while no request is open.
        self._anchor = f"inferq:api:{uuid.uuid4().hex}".encode()

    async def start(self) -> None:
        await self._subscribe(self._anchor, start_reader=True)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribe(self, channel: bytes, *, start_reader: bool = False) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirm[channel] = confirmed
        try:
            await self._pubsub.subscribe(channel)
            if start_reader:
                self._reader = asyncio.create_task(self._read(), name="pubsub-reader")
            await asyncio.wait_for(confirmed, timeout=10)
        finally:
            self._confirm.pop(channel, None)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        key = channel.encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues[key] = queue
        try:
            await self._subscribe(key)
            yield queue
        finally:
            self._queues.pop(key, None)
            # Not awaited here: this runs while the request may be cancelled
            # (client gone), and a cancelled await would skip the unsubscribe.
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

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # redis-py reconnects and re-subscribes on the next read.
                log.warning("pub/sub connection lost (%s); reconnecting", exc)
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
                future = self._confirm.get(channel)
                if future is not None and not future.done():
                    future.set_result(None)
