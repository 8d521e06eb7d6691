"""A bounded queue per model: when more interactive jobs wait for a model
than its live workers can take soon, a new one is refused at once (503 and
Retry-After) instead of waiting out its timeout behind the others."""

from __future__ import annotations

import json
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import APIError
from schemas import keys
from schemas.settings import Settings

log = logging.getLogger(__name__)

# Celery's Redis transport keeps a queue's priorities as separate lists: the
# queue itself (priority 0) and `<queue>\x06\x16<step>` for the other steps
# (kombu's PRIORITY_STEPS). inferq sends no priority, but count them all.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
RETRY_AFTER_SECONDS = 1


def queue_lists(model: str) -> list[str]:
    base = keys.model_queue(model)
    return [base, *(f"{base}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS)]


def depth_limit(settings: Settings, slots: int) -> int:
    """How many interactive jobs may wait for a model with `slots` live slots."""
    if settings.max_queue_depth is not None:
        return settings.max_queue_depth
    return settings.queue_depth_per_slot * slots


def _live_slots(raw: list[bytes], model: str, now: float) -> int:
    slots = 0
    for value in raw:
        try:
            info = json.loads(value)
        except ValueError:
            continue
        if info.get("model") == model and info.get("expires_at", 0) > now:
            slots += int(info.get("slots", 1))
    return slots


async def admit(client: aioredis.Redis, settings: Settings, model: str) -> None:
    """Raise the 503 when the model's interactive queue is full; one Redis
    round trip. A model without a live worker is not judged here (there is
    nothing to measure the queue against), nor are bulk lines, which have
    their own queue and are fed by the batch scheduler."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            for name in queue_lists(model):
                pipe.llen(name)
            pipe.hvals(keys.WORKERS)
            *lengths, workers = await pipe.execute()
    except RedisError:
        # Enqueueing will meet the same outage and answer for it.
        log.warning("could not measure the queue of %s", model, exc_info=True)
        return
    slots = _live_slots(workers, model, time.time())
    if slots == 0:
        return
    waiting = sum(int(n) for n in lengths)
    limit = depth_limit(settings, slots)
    if waiting >= limit:
        raise APIError(
            503,
            f"model '{model}' is overloaded: {waiting} requests are already waiting for "
            f"its {slots} slots; retry shortly",
            code="server_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
