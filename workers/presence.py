"""Worker presence (heartbeats: /health, and the API's watch of the worker
running each request), the listener that turns cancel announcements into
engine cancellations, and the check a job passes before it starts (`claim`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from schemas import keys, worker_stats

log = logging.getLogger(__name__)


# A worker that misses this many beats is dead (the API ends its requests).
MISSED_BEATS = 3


class Heartbeat:
    """Writes this worker's entry in keys.WORKERS every `interval` seconds.

    `on_register` runs whenever a beat creates the entry instead of updating
    it: at start, and after Redis came back empty (restarted), so that what the
    worker announced once (llama-server props) is announced again. `after_beat`
    runs after every beat that reached Redis. `stats`, when given, yields
    the entry's "stats" object (schemas/worker_stats.py) at every beat."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        model: str,
        worker_id: str,
        interval: float,
        slots: int,
        bulk_slots: int | None = None,
        on_register: Callable[[], None] | None = None,
        after_beat: Callable[[], None] | None = None,
        stats: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self._client = client
        self._field = keys.worker_field(model, worker_id)
        self._info = {
            "model": model,
            "worker_id": worker_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "slots": slots,
            "bulk_slots": slots if bulk_slots is None else bulk_slots,
            "started_at": time.time(),
            "interval": interval,
        }
        self._interval = interval
        self._on_register = on_register
        self._after_beat = after_beat
        self._stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        info = {**self._info, "expires_at": time.time() + MISSED_BEATS * self._interval}
        if self._stats is not None:
            info[worker_stats.FIELD] = self._stats()
        created = self._client.hset(keys.WORKERS, self._field, json.dumps(info))
        if created and self._on_register is not None:
            self._on_register()
        if self._after_beat is not None:
            self._after_beat()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception as exc:
                # Logged once per outage, not once a beat; the next beat retries.
                if not failing:
                    log.warning("heartbeat failed (%s); retrying every %.1f s", exc, self._interval)
                failing = True
                continue
            if failing:
                log.info("heartbeat restored")
            failing = False

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
        failing = False
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
            try:
                pubsub.subscribe(self._channel)
                if failing:
                    log.info("cancel listener subscribed again")
                failing = False
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        self._cancel(message["data"].decode(errors="replace"))
            except Exception as exc:
                # Redis gone (or restarted): subscribe again once it answers.
                if not failing:
                    log.warning("cancel listener lost Redis (%s); retrying", exc)
                failing = True
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _cancel(self, request_id: str) -> None:
        try:
            self._on_cancel(request_id)
        except Exception:
            log.exception("cancelling %s failed", request_id)

    def stop(self) -> None:
        self._stop.set()


def claim(
    client: redis.Redis, request_id: str, worker_id: str, *, request_timeout: float
) -> tuple[bytes | None, bool]:
    """The job's cancel mark, and whether this is the first copy of it to
    start (one round trip). Interactive jobs run at most once: a redelivered
    copy of one that started is dropped, never run into the same stream."""
    with client.pipeline(transaction=False) as pipe:
        pipe.get(keys.cancel_key(request_id))
        ttl = max(1, math.ceil(request_timeout))
        pipe.set(keys.started_key(request_id), worker_id or "1", nx=True, ex=ttl)
        cancelled, first = pipe.execute()
    return cancelled, bool(first)
