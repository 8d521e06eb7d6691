"""Worker presence (heartbeats the API's /health reads) and the listener
that turns cancel announcements into engine cancellations."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from schemas import keys

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self, client: redis.Redis, *, model: str, worker_id: str, interval: float, slots: int
    ) -> None:
        self._client = client
        self._field = keys.worker_field(model, worker_id)
        self._info = {
            "model": model,
            "worker_id": worker_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "slots": slots,
            "started_at": time.time(),
        }
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        info = {**self._info, "expires_at": time.time() + 3 * self._interval}
        self._client.hset(keys.WORKERS, self._field, json.dumps(info))

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self._client.hdel(keys.WORKERS, self._field)


class CancelListener:
    def __init__(
        self, client: redis.Redis, *, model: str, on_cancel: Callable[[str], None]
    ) -> None:
        self._client = client
        self._channel = keys.cancel_channel(model)
        self._on_cancel = on_cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        self._on_cancel(message["data"].decode())
                pubsub.close()
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); retrying", exc)
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
