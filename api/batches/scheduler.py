"""The batch scheduler: one thread in the API process (one leader among API
replicas, elected through a Redis lock) that moves every batch along.

Each tick it validates new batches, expires those past their window, finishes
cancelled ones, puts back lines whose lease ran out (a worker killed, a queue
message lost with Redis), feeds pending lines to the models' bulk queues in
chunks (never more than a few lines per live worker slot in flight, so 50,000
lines are never 50,000 messages), and writes the output files of batches with
no line left to run. All state is in the database; Redis only carries the
chunks in flight, so any of the processes may restart at any time.

One failure stays one failure: each batch is moved on its own, and an
exception while moving one (validating, expiring, cancelling, finalizing) is
logged with its id and retried next tick; after STEP_ATTEMPTS failures in a
row (counted in memory by the current leader) that batch fails with the
reason in its `errors`, and the others never notice. An outage of the
database or Redis fails the whole pass instead: it is logged and the next
tick tries again, no batch is failed for it. Leadership is fenced
(api.batches.leader): a leader that stalled past its lock's TTL cannot commit
beside its successor."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy import exc as sa_exc

from api.accounts.store import get_key
from api.batches import feeding, output, store
from api.batches.leader import Leadership, NotLeader
from api.batches.validate import LineReader, parse, reported, split_lines
from api.files import store as files_store
from schemas import batch_line_reads, batch_lines, keys
from schemas import batches as b
from schemas.batch_lines import Line
from schemas.registry import Registry
from schemas.settings import Settings
from schemas.tables import BATCHES, aware, utcnow

log = logging.getLogger("inferq.batches")

# Failures of the database or Redis themselves, not of one batch: the pass
# stops and the next tick tries again; no batch is failed for them.
OUTAGES: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)

# What stops a pass instead of failing one batch: an outage, or a newer leader.
ABORT_PASS: tuple[type[Exception], ...] = (NotLeader, *OUTAGES)

# A batch whose step raised this many times in a row fails, with the reason.
STEP_ATTEMPTS = 3

_STEPS = {
    b.VALIDATING: "validating",
    b.IN_PROGRESS: "moving on",
    b.FINALIZING: "finalizing",
    b.CANCELLING: "cancelling",
}


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
        self.lead = Leadership(client, db, self.holder, ttl=max(5.0, 5 * settings.batch_tick))
        # Per batch: steps failed in a row under this leader.
        self._failures: dict[str, int] = {}
        # Since when this process has led with the database in reach (None:
        # not leading, or the last pass failed). Lapsed leases are reclaimed
        # only a full lease after it, so workers that could not reach the
        # database meanwhile get to renew theirs before their lines go back.
        self._watching: float | None = None
        self._watch_epoch: int | None = None
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
            self.pass_once()
            self._wake.wait(self.settings.batch_tick)
            self._wake.clear()

    def pass_once(self) -> None:
        """Lead (or not) and tick; never raises."""
        try:
            if self.lead.lead():
                self.tick()
            else:
                self._watching = None
        except NotLeader as exc:
            self._watching = None
            log.warning("batch scheduler: %s; this pass is dropped", exc)
        except Exception:
            # A database or Redis outage: log it and try again next tick.
            self._watching = None
            log.exception("batch scheduler tick failed")

    # -- one tick ---------------------------------------------------------------

    def tick(self) -> None:
        if self._watching is None or self._watch_epoch != self.lead.epoch:
            self._watching, self._watch_epoch = time.monotonic(), self.lead.epoch
            self._failures.clear()
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
            self._step(batch_id, status, aware(expires_at) < now)
        if time.monotonic() - self._watching >= self.settings.batch_lease:
            try:
                feeding.reclaim(self.db, self.settings, self.lead.check)
            except ABORT_PASS:
                raise
            except Exception:
                # Feeding must go on even if putting lines back cannot.
                log.exception("batch scheduler: reclaiming lapsed leases failed")
        self._feed()

    def _step(self, batch_id: str, status: str, expired: bool) -> None:
        """Move one batch on; whatever it raises stays with that batch."""
        try:
            if status == b.VALIDATING:
                self._validate(batch_id)
            elif status == b.IN_PROGRESS and expired:
                self._expire(batch_id)
            elif status == b.IN_PROGRESS and not self._live(batch_id):
                self._set(batch_id, b.FINALIZING)
                self._finish(batch_id, b.COMPLETED)
            elif status == b.FINALIZING:
                self._finish(batch_id, b.COMPLETED)
            elif status == b.CANCELLING:
                self._cancel_lines(batch_id)
                if not self._live(batch_id):
                    self._finish(batch_id, b.BATCH_CANCELLED)
        except ABORT_PASS:
            raise
        except Exception as exc:
            self._step_failed(batch_id, _STEPS.get(status, status), exc)
        else:
            self._failures.pop(batch_id, None)

    def _step_failed(self, batch_id: str, step: str, exc: Exception) -> None:
        failures = self._failures.get(batch_id, 0) + 1
        self._failures[batch_id] = failures
        log.error(
            "batch %s: %s failed (attempt %d of %d)",
            batch_id,
            step,
            failures,
            STEP_ATTEMPTS,
            exc_info=exc,
        )
        if failures < STEP_ATTEMPTS:
            return
        reason = f"the batch failed while {step}: {type(exc).__name__}: {exc}"
        try:
            if store.fail_batch(self.db, batch_id=batch_id, reason=reason, fence=self.lead.check):
                log.error("batch %s failed: %s", batch_id, reason)
            self._failures.pop(batch_id, None)
            self._announce(batch_id)
        except ABORT_PASS:
            raise
        except Exception:
            log.exception("batch %s: could not be marked failed either", batch_id)

    def _set(self, batch_id: str, status: str, **fields: Any) -> None:
        store.set_status(self.db, batch_id=batch_id, status=status, fence=self.lead.check, **fields)

    def _live(self, batch_id: str) -> int:
        return batch_line_reads.live_count(self.db, batch_id=batch_id)

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
            self._set(batch_id, b.BATCH_FAILED, errors=reported(errors))
            return
        key = get_key(self.db, key_id=record.owner) if record.owner else None
        reader = LineReader(
            record.endpoint,
            self.registry,
            set(self._live_slots()),
            owner=record.owner,
            models=key.models if key is not None else None,
        )
        chunks = files_store.iter_content(self.db, file_id=file.id)
        parsed = parse(split_lines(chunks), record.endpoint, reader, self.lead.keepalive)
        if parsed.errors:
            self._set(batch_id, b.BATCH_FAILED, errors=reported(parsed.errors))
            log.info("batch %s failed validation: %d errors", batch_id, len(parsed.errors))
            return
        self._store_lines(batch_id, parsed.lines)
        log.info(
            "batch %s: %d lines validated in %.1f s",
            batch_id,
            len(parsed.lines),
            time.perf_counter() - started,
        )

    def _store_lines(self, batch_id: str, lines: list[Line]) -> None:
        try:
            store.insert_lines(self.db, batch_id=batch_id, lines=lines, fence=self.lead.check)
        except ABORT_PASS:
            raise
        except Exception:
            # A value validation did not foresee, which the database refuses:
            # line by line, so only the lines holding one fail.
            log.warning("batch %s: the database refused lines; storing them one by one", batch_id)
            refused = store.insert_lines(
                self.db, batch_id=batch_id, lines=lines, fence=self.lead.check, careful=True
            )
            log.warning("batch %s: %d lines the database refused failed", batch_id, refused)

    def _announce(self, batch_id: str) -> None:
        """Workers drop the batch's lines that have not reached a slot yet."""
        for model in batch_line_reads.batch_models(self.db, batch_id=batch_id):
            self.redis.publish(keys.cancel_channel(model), keys.batch_cancel_message(batch_id))

    def _cancel_lines(self, batch_id: str) -> None:
        with self.db.begin() as conn:
            self.lead.check(conn)
            batch_lines.cancel_lines(conn, batch_id=batch_id, now=utcnow())

    def _expire(self, batch_id: str) -> None:
        with self.db.begin() as conn:
            self.lead.check(conn)
            batch_lines.expire_lines(conn, batch_id=batch_id, now=utcnow())
        self._announce(batch_id)
        self._finish(batch_id, b.BATCH_EXPIRED)

    def _finish(self, batch_id: str, status: str) -> None:
        output_id, error_id = output.write_files(
            self.db, batch_id=batch_id, keepalive=self.lead.keepalive
        )
        try:
            self._set(batch_id, status, output_file_id=output_id, error_file_id=error_id)
        except BaseException:
            # Not this attempt's files after all (a newer leader, an outage):
            # whoever finishes the batch writes its own.
            output.discard(self.db, output_id, error_id)
            raise
        log.info("batch %s %s", batch_id, status)

    # -- feeding ------------------------------------------------------------------

    def _live_slots(self) -> dict[str, int]:
        return feeding.live_slots(self.redis)

    def _feed(self) -> None:
        slots = self._live_slots()
        if not slots:
            return
        for model in batch_line_reads.waiting_models(self.db):
            if model not in slots:
                continue
            try:
                feeding.feed_model(
                    self.db, self.settings, self.celery, self.lead.check, model, slots[model]
                )
            except ABORT_PASS:
                raise
            except Exception:
                # One model's lines must not keep the others waiting.
                log.exception("batch scheduler: feeding model %s failed", model)
