"""The batch scheduler: one thread in the API process (one leader among API
replicas, elected through a Redis lock) that moves every batch along.

Each tick it validates new batches, expires those past their window, finishes
cancelled ones, puts back lines whose lease ran out (a worker killed, a queue
message lost with Redis), feeds pending lines to the models' bulk queues in
chunks (never more than a few lines per live worker slot in flight, so 50,000
lines are never 50,000 messages), and writes the output files of batches with
no line left to run. All state is in the database; Redis only carries the
chunks in flight, so any of the processes may restart at any time."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, bindparam, func, select, update

from api import files_store
from api.batches import output, store
from api.batches.validate import LineReader, parse, reported, split_lines
from schemas import batches as b
from schemas import keys
from schemas.openai import error_body
from schemas.registry import Registry
from schemas.settings import Settings
from schemas.tables import BATCH_LINES as LINES
from schemas.tables import BATCHES, aware, utcnow

log = logging.getLogger("inferq.batches")


class BatchScheduler:
    def __init__(
        self,
        settings: Settings,
        db: Engine,
        registry: Registry,
        client: redis.Redis,
        celery: Celery,
    ) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry
        self.redis = client
        self.celery = celery
        self.holder = uuid.uuid4().hex
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._lead():
                    self.tick()
            except Exception:
                # A database or Redis outage: log it and try again next tick.
                log.exception("batch scheduler tick failed")
            self._wake.wait(self.settings.batch_tick)
            self._wake.clear()

    def _lead(self) -> bool:
        ttl = int(max(5.0, 5 * self.settings.batch_tick) * 1000)
        if self.redis.set(keys.BATCH_SCHEDULER_LOCK, self.holder, nx=True, px=ttl):
            return True
        if self.redis.get(keys.BATCH_SCHEDULER_LOCK) == self.holder.encode():
            self.redis.pexpire(keys.BATCH_SCHEDULER_LOCK, ttl)
            return True
        return False

    # -- one tick ---------------------------------------------------------------

    def tick(self) -> None:
        with self.db.connect() as conn:
            active = conn.execute(
                select(BATCHES.c.id, BATCHES.c.status, BATCHES.c.expires_at).where(
                    BATCHES.c.status.in_(b.ACTIVE_STATUSES)
                )
            ).all()
        if not active:
            return
        now = utcnow()
        for batch_id, status, expires_at in active:
            if status == b.VALIDATING:
                self._validate(batch_id)
            elif status == b.IN_PROGRESS and aware(expires_at) < now:
                self._expire(batch_id)
            elif status == b.IN_PROGRESS and not self._live(batch_id):
                store.set_status(self.db, batch_id=batch_id, status=b.FINALIZING)
                self._finish(batch_id, b.COMPLETED)
            elif status == b.FINALIZING:
                self._finish(batch_id, b.COMPLETED)
            elif status == b.CANCELLING:
                self._cancel_lines(batch_id)
                if not self._live(batch_id):
                    self._finish(batch_id, b.BATCH_CANCELLED)
        self._reclaim()
        self._feed()

    def _live(self, batch_id: str) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        LINES.c.batch_id == batch_id, LINES.c.state.in_(b.LIVE_STATES)
                    )
                ).scalar_one()
            )

    def _validate(self, batch_id: str) -> None:
        record = store.get_batch(self.db, batch_id=batch_id)
        if record is None:
            return
        started = time.perf_counter()
        file = files_store.get_file(self.db, file_id=record.input_file_id)
        if file is None:
            errors = [
                {
                    "code": "file_not_found",
                    "message": f"input file {record.input_file_id} does not exist (any more)",
                    "param": "input_file_id",
                    "line": None,
                }
            ]
            store.set_status(
                self.db, batch_id=batch_id, status=b.BATCH_FAILED, errors=reported(errors)
            )
            return
        reader = LineReader(record.endpoint, self.registry, set(self._live_slots()))
        chunks = files_store.iter_content(self.db, file_id=file.id)
        parsed = parse(split_lines(chunks), record.endpoint, reader)
        if parsed.errors:
            store.set_status(
                self.db, batch_id=batch_id, status=b.BATCH_FAILED, errors=reported(parsed.errors)
            )
            log.info("batch %s failed validation: %d errors", batch_id, len(parsed.errors))
            return
        store.insert_lines(self.db, batch_id=batch_id, lines=parsed.lines)
        log.info(
            "batch %s: %d lines validated in %.1f s",
            batch_id,
            len(parsed.lines),
            time.perf_counter() - started,
        )

    def _announce(self, batch_id: str) -> None:
        """Workers drop the batch's lines that have not reached a slot yet."""
        for model in store.batch_models(self.db, batch_id=batch_id):
            self.redis.publish(keys.cancel_channel(model), keys.batch_cancel_message(batch_id))

    def _cancel_lines(self, batch_id: str) -> None:
        with self.db.begin() as conn:
            conn.execute(
                update(LINES)
                .where(LINES.c.batch_id == batch_id, LINES.c.state.in_((b.PENDING, b.QUEUED)))
                .values(state=b.CANCELLED, finished_at=utcnow(), lease_until=None)
            )

    def _expire(self, batch_id: str) -> None:
        with self.db.begin() as conn:
            conn.execute(
                update(LINES)
                .where(LINES.c.batch_id == batch_id, LINES.c.state.in_(b.LIVE_STATES))
                .values(state=b.EXPIRED, finished_at=utcnow(), lease_until=None)
            )
        self._announce(batch_id)
        self._finish(batch_id, b.BATCH_EXPIRED)

    def _finish(self, batch_id: str, status: str) -> None:
        output_id, error_id = output.write_files(self.db, batch_id=batch_id)
        store.set_status(
            self.db,
            batch_id=batch_id,
            status=status,
            output_file_id=output_id,
            error_file_id=error_id,
        )
        log.info("batch %s %s", batch_id, status)

    # -- leases and feeding ---------------------------------------------------------

    def _reclaim(self) -> None:
        """Lines whose lease ran out: back to pending, or failed once lost
        `batch_max_attempts` times while running."""
        now = utcnow()
        lapsed = (
            LINES.c.state.in_((b.QUEUED, b.RUNNING)),
            LINES.c.lease_until < now,
        )
        limit = self.settings.batch_max_attempts
        lost = b.http_result(
            500,
            error_body(
                f"the worker running this request was lost {limit} times",
                type="server_error",
                code="worker_lost",
            ),
        )
        with self.db.begin() as conn:
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
            log.warning(
                "bulk lines with lapsed leases: %d back to pending, %d failed", back, failed
            )

    def _live_slots(self) -> dict[str, int]:
        """Live worker slots per model, from the workers' heartbeats."""
        slots: dict[str, int] = {}
        now = time.time()
        for raw in self.redis.hgetall(keys.WORKERS).values():
            try:
                info: dict[str, Any] = json.loads(raw)
            except ValueError:
                continue
            if info.get("expires_at", 0) > now:
                slots[info["model"]] = slots.get(info["model"], 0) + int(info.get("slots", 1))
        return slots

    def _feed(self) -> None:
        slots = self._live_slots()
        if not slots:
            return
        waiting = (
            select(LINES.c.model)
            .distinct()
            .select_from(LINES.join(BATCHES, BATCHES.c.id == LINES.c.batch_id))
            .where(LINES.c.state == b.PENDING, BATCHES.c.status == b.IN_PROGRESS)
        )
        with self.db.connect() as conn:
            models = [r[0] for r in conn.execute(waiting)]
        for model in models:
            if model in slots:
                self._feed_model(model, slots[model])

    def _feed_model(self, model: str, slots: int) -> None:
        chunk_lines = self.settings.batch_chunk_lines
        with self.db.connect() as conn:
            inflight = conn.execute(
                select(func.count()).where(
                    LINES.c.model == model, LINES.c.state.in_((b.QUEUED, b.RUNNING))
                )
            ).scalar_one()
        room = slots * self.settings.batch_inflight_per_slot - int(inflight)
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
            lease = utcnow() + timedelta(seconds=self.settings.batch_lease)
            queue = (
                update(LINES)
                .where(
                    LINES.c.batch_id == bindparam("b_batch"), LINES.c.line == bindparam("b_line")
                )
                .values(state=b.QUEUED, chunk=chunk, lease_until=lease)
            )
            with self.db.begin() as conn:
                picked = conn.execute(pick).all()
                if picked:
                    conn.execute(queue, [{"b_batch": bid, "b_line": line} for bid, line in picked])
            if not picked:
                return
            # Sent after the commit: if this process dies in between, the
            # lease runs out and the lines are queued again.
            self.celery.send_task(keys.TASK_BULK, args=[chunk], queue=keys.bulk_queue(model))
            room -= len(picked)
