"""The scheduler's line work across batches: put back lines whose lease ran
out, and feed pending lines to each model's bulk queue in chunks."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

import redis
from celery import Celery
from sqlalchemy import Engine, bindparam, func, select, update

from api.batches.store import Fence
from schemas import batches as b
from schemas import heartbeats, keys
from schemas.events import error_body
from schemas.settings import Settings
from schemas.tables import BATCH_LINES as LINES
from schemas.tables import BATCHES, utcnow

log = logging.getLogger("inferq.batches")


def reclaim(db: Engine, settings: Settings, fence: Fence) -> None:
    """Lines whose lease ran out: back to pending, or failed once lost
    `batch_max_attempts` times while running."""
    now = utcnow()
    lapsed = (
        LINES.c.state.in_((b.QUEUED, b.RUNNING)),
        LINES.c.lease_until < now,
    )
    limit = settings.batch_max_attempts
    lost = b.http_result(
        500,
        error_body(
            f"the worker running this request was lost {limit} times",
            type="server_error",
            code="worker_lost",
        ),
    )
    with db.begin() as conn:
        fence(conn)
        failed = conn.execute(
            update(LINES)
            .where(*lapsed, LINES.c.attempts >= limit)
            .values(state=b.FAILED, result=lost, finished_at=now, lease_until=None)
        ).rowcount
        back = conn.execute(
            update(LINES)
            .where(*lapsed)
            .values(state=b.PENDING, chunk=None, worker=None, lease_until=None)
        ).rowcount
    if failed or back:
        log.warning("bulk lines with lapsed leases: %d back to pending, %d failed", back, failed)


def live_slots(client: redis.Redis) -> dict[str, int]:
    """Live worker slots per model, from the workers' heartbeats."""
    return heartbeats.live_slots(client.hgetall(keys.WORKERS).values(), time.time())


def waiting_models(db: Engine) -> list[str]:
    """Models with pending lines in running batches."""
    waiting = (
        select(LINES.c.model)
        .distinct()
        .select_from(LINES.join(BATCHES, BATCHES.c.id == LINES.c.batch_id))
        .where(LINES.c.state == b.PENDING, BATCHES.c.status == b.IN_PROGRESS)
    )
    with db.connect() as conn:
        return [r[0] for r in conn.execute(waiting)]


def feed_model(
    db: Engine, settings: Settings, celery: Celery, fence: Fence, model: str, slots: int
) -> None:
    chunk_lines = settings.batch_chunk_lines
    with db.connect() as conn:
        inflight = conn.execute(
            select(func.count()).where(
                LINES.c.model == model, LINES.c.state.in_((b.QUEUED, b.RUNNING))
            )
        ).scalar_one()
    room = slots * settings.batch_inflight_per_slot - int(inflight)
    # Top up in whole chunks where the backlog allows: a line at a time
    # would be a queue message and a claim per line.
    if inflight and room < max(1, chunk_lines // 2):
        return
    while room > 0:
        chunk = f"chunk_{uuid.uuid4().hex}"
        take = min(chunk_lines, room)
        pick = (
            select(LINES.c.batch_id, LINES.c.line)
            .select_from(LINES.join(BATCHES, BATCHES.c.id == LINES.c.batch_id))
            .where(
                LINES.c.model == model,
                LINES.c.state == b.PENDING,
                BATCHES.c.status == b.IN_PROGRESS,
            )
            .order_by(BATCHES.c.created_at, LINES.c.batch_id, LINES.c.line)
            .limit(take)
            .with_for_update(of=LINES, skip_locked=True)
        )
        lease = utcnow() + timedelta(seconds=settings.batch_lease)
        queue = (
            update(LINES)
            .where(LINES.c.batch_id == bindparam("b_batch"), LINES.c.line == bindparam("b_line"))
            .values(state=b.QUEUED, chunk=chunk, lease_until=lease)
        )
        with db.begin() as conn:
            fence(conn)
            picked = conn.execute(pick).all()
            if picked:
                conn.execute(queue, [{"b_batch": bid, "b_line": line} for bid, line in picked])
        if not picked:
            return
        # Sent after the commit: if this process dies in between, the
        # lease runs out and the lines are queued again.
        celery.send_task(keys.TASK_BULK, args=[chunk], queue=keys.bulk_queue(model))
        room -= len(picked)
