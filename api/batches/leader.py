"""Leadership of the batch scheduler: elected through a Redis lock, fenced in
the database.

The Redis lock (a TTL, renewed every tick and during long work) decides who
should lead. It cannot stop a leader that stalled past its TTL (a long
validation, a pause of the process) from waking up beside its successor, so
each win also takes a fencing token: `batch_scheduler.epoch`, bumped in the
database. Every transaction the scheduler commits starts with `check`, which
locks that row and compares the epoch; a stale leader's transaction raises
NotLeader and rolls back, and a takeover waits for the transaction in flight.
So at any moment at most one process commits scheduler work.

A leader frozen inside such a transaction (SIGSTOP, a VM pause) would hold
the row until it wakes, and no successor could take over meanwhile: a
successor that waited for the row past `lock_timeout` ends that session
(`pg_terminate_backend`), which rolls its transaction back. That is safe:
its Redis lock lapsed, so it leads no more, and nothing of it commits."""

from __future__ import annotations

import logging
import time

import redis
from sqlalchemy import Connection, Engine, insert, select, text, update
from sqlalchemy.exc import OperationalError

from schemas import keys
from schemas.tables import SCHEDULER_EPOCH, utcnow

log = logging.getLogger("inferq.batches")

ROW = 1
# Postgres' SQLSTATE for a lock_timeout that ran out.
LOCK_NOT_AVAILABLE = "55P03"

# Extend the lock only while it is still ours (GET and PEXPIRE in one step).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class NotLeader(Exception):
    """This process no longer leads the batch scheduler: drop the work at hand."""


class Leadership:
    def __init__(self, client: redis.Redis, db: Engine, holder: str, ttl: float) -> None:
        self.redis = client
        self.db = db
        self.holder = holder
        self.ttl_ms = int(ttl * 1000)
        self.epoch: int | None = None
        self._renewed = 0.0
        self._renew = client.register_script(_RENEW)

    def lead(self) -> bool:
        """Take or keep the lock (once per tick); a fresh win takes a new epoch."""
        if self.redis.set(keys.BATCH_SCHEDULER_LOCK, self.holder, nx=True, px=self.ttl_ms):
            if self.epoch is not None:
                log.warning("batch scheduler: the leader lock had lapsed; taken again")
            self.epoch = None
        elif not self._extend():
            if self.epoch is not None:
                log.warning("batch scheduler: another process leads now")
            self.epoch = None
            return False
        if self.epoch is None:
            self.epoch = self._take_epoch()
            log.info("batch scheduler: leading (epoch %d)", self.epoch)
        return True

    def keepalive(self) -> None:
        """During long work: extend the lock (at most a few times per TTL);
        NotLeader when it is gone."""
        if time.monotonic() - self._renewed < self.ttl_ms / 5000:
            return
        if self.epoch is None or not self._extend():
            self.epoch = None
            raise NotLeader("the batch scheduler's leader lock lapsed")

    def check(self, conn: Connection) -> None:
        """The first statement of every scheduler transaction: lock the epoch
        row (until commit) and make sure no newer leader took it."""
        epoch = self.epoch
        if epoch is None:
            raise NotLeader("not the batch scheduler's leader")
        still = conn.execute(
            update(SCHEDULER_EPOCH)
            .where(SCHEDULER_EPOCH.c.id == ROW, SCHEDULER_EPOCH.c.epoch == epoch)
            .values(epoch=epoch)
        ).rowcount
        if still != 1:
            self.epoch = None
            raise NotLeader(f"a newer batch scheduler leader took over (epoch {epoch} is stale)")

    def _extend(self) -> bool:
        ok = bool(self._renew(keys=[keys.BATCH_SCHEDULER_LOCK], args=[self.holder, self.ttl_ms]))
        if ok:
            self._renewed = time.monotonic()
        return ok

    def _take_epoch(self) -> int:
        try:
            return self._bump_epoch()
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
        ended = self._end_stalled_leaders()
        log.warning(
            "batch scheduler: a stalled leader held the epoch row; ended %d session(s)", ended
        )
        return self._bump_epoch()

    def _end_stalled_leaders(self) -> int:
        """End the database sessions whose open transaction holds the epoch
        table (a scheduler transaction of a leader whose lock lapsed)."""
        with self.db.begin() as conn:
            pids = conn.execute(
                text(
                    "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "WHERE c.relname = :table AND l.granted AND l.pid <> pg_backend_pid()"
                ),
                {"table": SCHEDULER_EPOCH.name},
            ).scalars()
            ended = 0
            for pid in list(pids):
                ended += bool(
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
                )
        return ended

    def _bump_epoch(self) -> int:
        with self.db.begin() as conn:
            if conn.dialect.name == "postgresql":
                # A stalled leader mid-transaction holds the row: do not wait
                # on it forever (see _take_epoch).
                conn.execute(text("SET LOCAL lock_timeout = '3s'"))
            bumped = conn.execute(
                update(SCHEDULER_EPOCH)
                .where(SCHEDULER_EPOCH.c.id == ROW)
                .values(epoch=SCHEDULER_EPOCH.c.epoch + 1, holder=self.holder, acquired_at=utcnow())
            ).rowcount
            if not bumped:
                conn.execute(
                    insert(SCHEDULER_EPOCH).values(
                        id=ROW, epoch=1, holder=self.holder, acquired_at=utcnow()
                    )
                )
            epoch = conn.execute(
                select(SCHEDULER_EPOCH.c.epoch).where(SCHEDULER_EPOCH.c.id == ROW)
            ).scalar_one()
        self._renewed = time.monotonic()
        return int(epoch)
