"""Usage rows: one per finished request, written off the request's path.

`record_usage` only appends to an in-memory buffer; a background thread per
database writes the buffer in batched transactions. A request never waits on
the database, so an outage of Postgres delays accounting, never a request.
Rows leave the buffer only once their transaction committed, and every insert
is `ON CONFLICT (request_id) DO NOTHING`: a flush retried after a commit whose
answer was lost, or a job run twice, still leaves one row per request. Past
`INFERQ_USAGE_BUFFER` rows (a long outage) the oldest are dropped, loudly."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from schemas.settings import get_settings
from schemas.tables import USAGE, utcnow

log = logging.getLogger(__name__)

# The database being away: rows are kept and the write retried.
OUTAGES = (OperationalError, InterfaceError, DisconnectionError, SATimeoutError)

# Rows per transaction.
FLUSH_ROWS = 500
# Waits between attempts while the database is away (seconds, doubling).
RETRY_FIRST, RETRY_MAX = 0.5, 5.0


def insert_usage(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert usage rows; a request that already has its row keeps it."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(
            postgresql.insert(USAGE).on_conflict_do_nothing(index_elements=["request_id"]),
            list(rows),
        )
    elif conn.dialect.name == "sqlite":
        conn.execute(
            sqlite.insert(USAGE).on_conflict_do_nothing(index_elements=["request_id"]),
            list(rows),
        )
    else:
        conn.execute(insert(USAGE), list(rows))


class UsageWriter:
    """A bounded buffer of usage rows and the thread that writes it."""

    def __init__(self, engine: Engine, limit: int) -> None:
        self.engine = engine
        self.limit = limit
        self.dropped = 0
        self._rows: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="usage-writer", daemon=True)
        self._thread.start()

    def add(self, row: dict[str, Any]) -> None:
        with self._cond:
            if len(self._rows) >= self.limit:
                self._rows.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error(
                        "usage buffer full (%d rows, the database has been away): "
                        "%d oldest usage rows dropped so far",
                        self.limit,
                        self.dropped,
                    )
            self._rows.append(row)
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._rows)

    def flush(self, timeout: float) -> bool:
        """Wait until every buffered row is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        """Stop the writer thread (rows still buffered stay unwritten)."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(RETRY_MAX + 1)

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        try:
            with self.engine.begin() as conn:
                insert_usage(conn, batch)
            return
        except OUTAGES:
            raise
        except Exception:
            log.exception("usage rows refused; writing them one by one")
        # A row the database refuses (not an outage) is dropped alone, so it
        # cannot hold every later row back.
        for row in batch:
            try:
                with self.engine.begin() as conn:
                    insert_usage(conn, [row])
            except OUTAGES:
                raise
            except Exception:
                log.exception("usage row of %s refused; dropped", row.get("request_id"))

    def _loop(self) -> None:
        delay = RETRY_FIRST
        failing_since: float | None = None
        while not self._closed.is_set():
            with self._cond:
                while not self._rows and not self._closed.is_set():
                    self._cond.wait()
                if self._closed.is_set():
                    return
                batch = [self._rows[i] for i in range(min(FLUSH_ROWS, len(self._rows)))]
            try:
                self._insert(batch)
            except Exception:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.exception("writing usage rows failed; kept and retried")
                self._closed.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failing_since is not None:
                log.warning(
                    "usage rows written again after %.1f s", time.monotonic() - failing_since
                )
                failing_since, delay = None, RETRY_FIRST
            with self._cond:
                # Only this thread removes from the left, except add() past
                # the bound: drop what is still ours of this batch.
                for row in batch:
                    if self._rows and self._rows[0] is row:
                        self._rows.popleft()
                self._cond.notify_all()


_writers: dict[int, UsageWriter] = {}
_writers_lock = threading.Lock()


def writer_for(engine: Engine) -> UsageWriter:
    with _writers_lock:
        writer = _writers.get(id(engine))
        if writer is None or writer.engine is not engine:
            writer = UsageWriter(engine, get_settings().usage_buffer)
            _writers[id(engine)] = writer
        return writer


def flush_all(timeout: float = 5.0) -> None:
    """At exit: give buffered rows a few seconds to reach the database."""
    deadline = time.monotonic() + timeout
    for writer in list(_writers.values()):
        if not writer.flush(max(0.0, deadline - time.monotonic())):
            log.error("exiting with %d usage rows not written", writer.pending())


atexit.register(flush_all)


def record_usage(
    engine: Engine,
    *,
    request_id: str,
    model: str,
    endpoint: str,
    prompt_tokens: int,
    completion_tokens: int,
    ttft_ms: float | None,
    duration_ms: float,
    status: str,
    worker: str | None = None,
    key_id: str | None = None,
    cached_tokens: int = 0,
    batch_id: str | None = None,
) -> None:
    """Queue the usage row of a finished request; never blocks, never raises.
    `key_id` is the API key it is charged to (None while auth is off),
    `cached_tokens` the prompt tokens its slot reused instead of evaluating."""
    try:
        writer_for(engine).add(
            {
                "created_at": utcnow(),
                "request_id": request_id,
                "model": model,
                "endpoint": endpoint,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "ttft_ms": ttft_ms,
                "duration_ms": duration_ms,
                "status": status,
                "worker": worker,
                "key_id": key_id,
                "cached_tokens": cached_tokens,
                "batch_id": batch_id,
            }
        )
    except Exception:
        # Accounting must never fail the request it accounts for.
        log.exception("could not record usage for %s", request_id)
