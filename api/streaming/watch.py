"""Follows worker heartbeats for every open request of this API process.

One task reads the workers hash (keys.WORKERS) every half heartbeat: one Redis
round trip per tick whatever the number of requests, nothing per token. Each
tick, for every open request:
- accepted by a worker that is now dead: queued again if no token reached the
  client yet (and a worker of the model is left), else ended with a 503
  `worker_lost` (an error event, then [DONE], on a stream);
- not accepted yet, when a worker of its model died: queued again under a new
  id (the dead worker may have taken it; which one did is unknowable);
- not accepted yet, its model without any live worker (after the start-up
  grace): ended with a 503 `model_unavailable`.
The same snapshot answers "has this model a live worker?" for new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from api.errors import APIError
from schemas import keys
from schemas.events import ErrorEvent, encode
from schemas.heartbeats import read_beats

log = logging.getLogger(__name__)

# A job is queued again at most this often before it fails: a request that
# kills every worker that takes it must not take down the whole fleet.
MAX_REQUEUES = 2
# A worker is dead when its entry has expired (it missed 3 beats), or when
# the entry is missing (deleted, or Redis restarted empty) for this many beats.
_MISSING_BEATS = 2.0


def unavailable(message: str, code: str, *, retry_after: int = 1) -> APIError:
    """A 503 in the OpenAI envelope with Retry-After."""
    return APIError(
        503,
        message,
        code=code,
        type="server_error",
        headers={"Retry-After": str(retry_after)},
    )


def lost_event(message: str, code: str) -> ErrorEvent:
    return ErrorEvent(message=message, error_type="server_error", code=code, status=503)


@dataclass(eq=False)
class Tracked:
    """What the watch knows of one open request (JobStream keeps it current)."""

    model: str
    queue: asyncio.Queue[bytes]
    # Queues the job again under a new id; False when it could not.
    requeue: Callable[[], Awaitable[bool]]
    worker_id: str | None = None
    # A token went out to the client: re-running would repeat it.
    progressed: bool = False
    # A terminal event was read, or pushed by the API itself (`abandoned`:
    # the job may still run somewhere and should be cancelled).
    ended: bool = False
    abandoned: bool = False
    requeues: int = 0
    busy: bool = False
    opened: float = field(default_factory=time.monotonic)

    def fail(self, event: ErrorEvent) -> None:
        """End the request from the API side."""
        if self.ended:
            return
        self.ended = self.abandoned = True
        self.queue.put_nowait(encode(event))


class WorkerWatch:
    def __init__(self, client: aioredis.Redis, *, interval: float, grace: float) -> None:
        self._client = client
        self._interval = interval
        self._tick_s = max(interval / 2, 0.05)
        self._grace = grace
        self._started = time.monotonic()
        self._tracked: set[Tracked] = set()
        # Workers alive at the last tick (id -> model), and since when
        # (monotonic) workers we follow have had no entry at all.
        self._live: dict[str, str] = {}
        self._missing: dict[str, float] = {}
        self._expired: set[str] = set()
        self._died: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._requeues: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="worker-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def add(self, tracked: Tracked) -> None:
        self._tracked.add(tracked)

    def discard(self, tracked: Tracked) -> None:
        self._tracked.discard(tracked)

    def fail_all(self, event: ErrorEvent) -> None:
        for tracked in list(self._tracked):
            tracked.fail(event)

    def in_grace(self) -> bool:
        return time.monotonic() - self._started < self._grace

    def has_worker(self, model: str) -> bool:
        return model in self._live.values()

    async def require_worker(self, model: str) -> None:
        """503 `model_unavailable` at once for a model without a live worker,
        once the start-up grace is over. The snapshot is checked first; only
        when it has no worker is the hash read again (a worker may have started
        since the last tick). If Redis cannot tell, the request goes on (and
        fails on Redis itself, saying so)."""
        if self.in_grace() or self.has_worker(model):
            return
        try:
            await self._refresh()
        except Exception:
            return
        if not self.has_worker(model):
            raise unavailable(
                f"no worker of model '{model}' is running; retry once one has started",
                "model_unavailable",
                retry_after=max(1, round(3 * self._interval)),
            )

    async def _refresh(self) -> None:
        raw = await self._client.hgetall(keys.WORKERS)
        # Deaths seen here are acted on at the next tick.
        self._died |= self._update(raw)

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis down: no verdict on any worker (the hub ends the
                # streams whose events it may have lost).
                log.debug("worker watch tick failed: %s", exc)
            await asyncio.sleep(self._tick_s)

    async def _tick(self) -> None:
        await self._refresh()
        died, self._died = self._died, set()
        for tracked in list(self._tracked):
            if not tracked.ended and not tracked.busy:
                self._check(tracked, died)

    def _update(self, raw: Mapping[Any, Any]) -> set[str]:
        """Refresh the snapshot; the models that lost a worker since the last tick."""
        now, mono = time.time(), time.monotonic()
        fresh: dict[str, str] = {}
        expired: set[str] = set()
        for beat in read_beats(raw.values()):
            if beat.alive(now):
                fresh[beat.worker_id] = beat.model
            else:
                expired.add(beat.worker_id)
        # Ids worth following: workers alive before, and those requests name.
        followed = set(self._live) | {t.worker_id for t in self._tracked if t.worker_id}
        missing = {}
        for worker_id in followed - fresh.keys() - expired:
            missing[worker_id] = self._missing.get(worker_id, mono)
        self._missing = missing
        self._expired = expired
        limit = _MISSING_BEATS * self._interval
        live = dict(fresh)
        died: set[str] = set()
        for worker_id, model in self._live.items():
            if worker_id in fresh:
                continue
            if worker_id in missing and mono - missing[worker_id] <= limit:
                live[worker_id] = model  # likely Redis restarted: it beats again soon
            else:
                log.warning("worker %s of model %s stopped beating", worker_id, model)
                died.add(model)
        self._live = live
        return died

    def _dead(self, worker_id: str) -> bool:
        if worker_id in self._live:
            return False
        if worker_id in self._expired:
            return True
        first = self._missing.get(worker_id)
        return first is not None and time.monotonic() - first > _MISSING_BEATS * self._interval

    def _check(self, tracked: Tracked, died: set[str]) -> None:
        if tracked.queue.qsize():
            # Events it has not read yet (its Accepted, say): judge it once read.
            return
        model = tracked.model
        if tracked.worker_id is not None:
            if not self._dead(tracked.worker_id):
                return
            if tracked.progressed or not self.has_worker(model):
                self._lose(tracked, f"the worker running this request ({tracked.worker_id}) died")
            else:
                self._spawn_requeue(tracked)
            return
        if not self.has_worker(model):
            if not self.in_grace():
                tracked.fail(
                    lost_event(f"no worker of model '{model}' is running", "model_unavailable")
                )
        elif model in died:
            self._spawn_requeue(tracked)

    def _lose(self, tracked: Tracked, message: str) -> None:
        log.warning("%s; ending the request", message)
        tracked.fail(lost_event(message, "worker_lost"))

    def _spawn_requeue(self, tracked: Tracked) -> None:
        if tracked.requeues >= MAX_REQUEUES:
            self._lose(tracked, f"the request lost its worker {tracked.requeues + 1} times")
            return
        tracked.busy = True

        async def requeue() -> None:
            try:
                if not await tracked.requeue():
                    self._lose(tracked, "its worker died and the request could not be queued again")
            except Exception as exc:
                log.warning("queueing a request again failed: %s", exc)
                self._lose(tracked, "its worker died and the request could not be queued again")
            finally:
                tracked.busy = False

        task = asyncio.get_running_loop().create_task(requeue())
        self._requeues.add(task)
        task.add_done_callback(self._requeues.discard)
