"""A bounded queue per model: when more interactive jobs wait for a model
than its live workers can take soon, a new one is refused at once (503 and
Retry-After) instead of waiting out its timeout behind the others."""

from __future__ import annotations

import logging
import math
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import APIError
from schemas import keys
from schemas.heartbeats import live_slots
from schemas.settings import Settings

log = logging.getLogger(__name__)

# Celery's Redis transport keeps a queue's priorities as separate lists: the
# queue itself (priority 0) and `<queue>\x06\x16<step>` for the other steps
# (kombu's PRIORITY_STEPS). inferq sends no priority, but count them all.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
# Retry-After when nothing is known of the model's job times yet, and the most
# it ever says (the openai client honours up to 60 s).
RETRY_AFTER_SECONDS = 1
MAX_RETRY_AFTER_SECONDS = 60


def queue_lists(model: str) -> list[str]:
    base = keys.model_queue(model)
    return [base, *(f"{base}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS)]


def depth_limit(settings: Settings, slots: int) -> int:
    """How many interactive jobs may wait for a model with `slots` live slots."""
    if settings.max_queue_depth is not None:
        return settings.max_queue_depth
    return settings.queue_depth_per_slot * slots


class Waiting:
    """Interactive jobs this API process queued that no worker has accepted
    yet, per model. The queue's length alone lags: many requests arriving
    together all read the same length before any of them is queued, and a
    job a worker has taken but not accepted yet is in no list. The count is
    read and raised with no await in between, so within one process the
    depth is never passed; replicas each hold their own count beside the
    shared queue length."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, model: str) -> int:
        return self._counts.get(model, 0)

    def hold(self, model: str) -> Ticket:
        self._counts[model] = self.count(model) + 1
        return Ticket(self, model)

    def _drop(self, model: str) -> None:
        left = self.count(model) - 1
        if left > 0:
            self._counts[model] = left
        else:
            self._counts.pop(model, None)


class Ticket:
    """One job's place in its model's count, given back once (accepted by a
    worker, or ended)."""

    def __init__(self, waiting: Waiting | None, model: str) -> None:
        self._waiting = waiting
        self._model = model

    def release(self) -> None:
        if self._waiting is not None:
            self._waiting._drop(self._model)
            self._waiting = None


class JobTimes:
    """A moving average of how long a model's jobs run, from their Done
    events, so a refusal can say when a place is likely to free up: a
    Retry-After of one second under a long queue only brings the same
    clients back every second, and their refusals take CPU from the engine."""

    def __init__(self, weight: float = 0.1) -> None:
        self._weight = weight
        self._seconds: dict[str, float] = {}

    def observe(self, model: str, seconds: float) -> None:
        if seconds <= 0:
            return
        old = self._seconds.get(model)
        self._seconds[model] = seconds if old is None else old + self._weight * (seconds - old)

    def retry_after(self, model: str, queued: int, slots: int) -> int:
        """Seconds until the queue ahead has about drained through the slots."""
        seconds = self._seconds.get(model)
        if seconds is None:
            return RETRY_AFTER_SECONDS
        estimate = math.ceil(queued / max(slots, 1) * seconds)
        return max(RETRY_AFTER_SECONDS, min(MAX_RETRY_AFTER_SECONDS, estimate))


# One count and one set of averages per API process.
WAITING = Waiting()
JOB_TIMES = JobTimes()


async def admit(
    client: aioredis.Redis, settings: Settings, model: str, waiting: Waiting = WAITING
) -> Ticket:
    """Raise the 503 when the model's interactive queue is full, else hold a
    place in it (the caller releases the ticket when a worker accepts the job
    or it ends); one Redis round trip. A model without a live worker is not
    judged here (there is nothing to measure the queue against), nor are bulk
    lines, which have their own queue and are fed by the batch scheduler."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            for name in queue_lists(model):
                pipe.llen(name)
            pipe.hvals(keys.WORKERS)
            *lengths, workers = await pipe.execute()
    except RedisError:
        # Enqueueing will meet the same outage and answer for it.
        log.warning("could not measure the queue of %s", model, exc_info=True)
        return Ticket(None, model)
    slots = live_slots(workers, time.time()).get(model, 0)
    if slots == 0:
        return Ticket(None, model)
    # No await from here to hold(): the check and the hold are one step.
    queued = max(sum(int(n) for n in lengths), waiting.count(model))
    limit = depth_limit(settings, slots)
    if queued >= limit:
        raise APIError(
            503,
            f"model '{model}' is overloaded: {queued} requests are already waiting for "
            f"its {slots} slots; retry shortly",
            code="server_overloaded",
            headers={"Retry-After": str(JOB_TIMES.retry_after(model, queued, slots))},
        )
    return waiting.hold(model)
