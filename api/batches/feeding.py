"""The scheduler's line work across batches: put back lines whose lease ran
out, and feed pending lines to each model's bulk queue in chunks (the
statements are in schemas.batch_lines and schemas.batch_line_reads)."""

from __future__ import annotations

import logging
import time
import uuid

import redis
from celery import Celery
from sqlalchemy import Engine

from schemas import batch_line_reads, batch_lines, heartbeats, keys
from schemas.batch_lines import Fence
from schemas.settings import Settings

log = logging.getLogger("inferq.batches")


def reclaim(db: Engine, settings: Settings, fence: Fence) -> None:
    """Lines whose lease ran out: back to pending, or failed once lost
    `batch_max_attempts` times while running."""
    failed, back = batch_lines.reclaim_expired(
        db, max_attempts=settings.batch_max_attempts, fence=fence
    )
    if failed or back:
        log.warning("bulk lines with lapsed leases: %d back to pending, %d failed", back, failed)


def live_slots(client: redis.Redis) -> dict[str, int]:
    """Live workers' sequences for batch lines per model, from their heartbeats."""
    return heartbeats.live_slots(client.hgetall(keys.WORKERS).values(), time.time(), bulk=True)


def feed_model(
    db: Engine, settings: Settings, celery: Celery, fence: Fence, model: str, slots: int
) -> None:
    chunk_lines = settings.batch_chunk_lines
    inflight = batch_line_reads.inflight_count(db, model=model)
    room = slots * settings.batch_inflight_per_slot - inflight
    # Top up in whole chunks where the backlog allows: a line at a time
    # would be a queue message and a claim per line.
    if inflight and room < max(1, chunk_lines // 2):
        return
    while room > 0:
        chunk = f"chunk_{uuid.uuid4().hex}"
        queued = batch_lines.queue_lines(
            db,
            model=model,
            chunk=chunk,
            take=min(chunk_lines, room),
            lease=settings.batch_lease,
            fence=fence,
        )
        if not queued:
            return
        # Sent after the commit: if this process dies in between, the
        # lease runs out and the lines are queued again.
        celery.send_task(keys.TASK_BULK, args=[chunk], queue=keys.bulk_queue(model))
        room -= queued
