"""The batch-line state machine against real Postgres: each transition moves
lines only from the states it names, and its guard holds (a stale chunk's
result is not written, a fenced-out leader's write is refused, a claimed
line is not claimed twice)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import DataError

from inferq.migrate import upgrade
from schemas import batch_line_reads as reads
from schemas import batch_lines as bl
from schemas import batches as b
from schemas.db import make_engine
from schemas.tables import BATCH_LINES as LINES
from schemas.tables import BATCHES, utcnow

JOB = {"task": "generate", "payload": {"x": 1}, "options": {}}


class Fenced(Exception):
    """What a leader's fence raises once a newer leader took over."""


def lead(conn: Connection) -> None:
    """A fence that lets the transaction through."""


def fenced_out(conn: Connection) -> None:
    # Called inside the transaction, before any statement of the transition.
    assert conn.in_transaction()
    raise Fenced("a newer leader took over")


@pytest.fixture
def db(pg_url: str) -> Iterator[Engine]:
    upgrade(pg_url)
    engine = make_engine(pg_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _batch(db: Engine, batch_id: str, status: str = b.VALIDATING, age: int = 0) -> str:
    now = utcnow() - timedelta(seconds=age)
    with db.begin() as conn:
        conn.execute(
            insert(BATCHES).values(
                id=batch_id,
                created_at=now,
                endpoint="/v1/chat/completions",
                input_file_id="file-x",
                completion_window="24h",
                expires_at=now + timedelta(hours=24),
                status=status,
            )
        )
    return batch_id


def _lines(n: int, model: str = "tiny") -> list[bl.Line]:
    return [bl.Line(i, f"c-{i}", f"batch_req_{i}", model, JOB) for i in range(n)]


def _stored(db: Engine, batch_id: str, n: int, model: str = "tiny") -> str:
    _batch(db, batch_id)
    bl.store_lines(db, batch_id=batch_id, lines=_lines(n, model), fence=lead)
    return batch_id


def _rows(db: Engine, batch_id: str) -> list[Any]:
    with db.connect() as conn:
        query = select(LINES).where(LINES.c.batch_id == batch_id).order_by(LINES.c.line)
        return list(conn.execute(query).all())


def _status(db: Engine, batch_id: str) -> str:
    with db.connect() as conn:
        query = select(BATCHES.c.status).where(BATCHES.c.id == batch_id)
        return str(conn.execute(query).scalar_one())


def _set(db: Engine, batch_id: str, **values: Any) -> None:
    with db.begin() as conn:
        conn.execute(update(LINES).where(LINES.c.batch_id == batch_id).values(**values))


def _running(db: Engine, batch_id: str, n: int, chunk: str = "c1", worker: str = "w1") -> None:
    """n lines queued under `chunk` and claimed by `worker`."""
    _stored(db, batch_id, n)
    assert bl.queue_lines(db, model="tiny", chunk=chunk, take=n, lease=30, fence=lead) == n
    assert len(bl.claim_lines(db, chunk=chunk, worker=worker, lease=30)) == n


# -- storing ---------------------------------------------------------------------


def test_store_lines_stores_once_and_starts_the_batch(db: Engine) -> None:
    batch_id = _batch(db, "batch_a")
    rejected = bl.Line(2, "bad", "batch_req_2", "tiny", None, b.http_result(400, {"e": 1}))
    lines = [*_lines(2), rejected]
    assert bl.store_lines(db, batch_id=batch_id, lines=lines, fence=lead) == 0
    # Stored again (a validation that started over): no duplicates.
    bl.store_lines(db, batch_id=batch_id, lines=lines, fence=lead)
    rows = _rows(db, batch_id)
    assert [(r.line, r.state, r.attempts) for r in rows] == [
        (0, b.PENDING, 0),
        (1, b.PENDING, 0),
        (2, b.FAILED, 0),
    ]
    assert rows[0].finished_at is None and rows[2].finished_at is not None
    assert _status(db, batch_id) == b.IN_PROGRESS


def test_store_lines_only_starts_a_validating_batch(db: Engine) -> None:
    batch_id = _batch(db, "batch_a", status=b.CANCELLING)
    bl.store_lines(db, batch_id=batch_id, lines=_lines(1))
    assert _status(db, batch_id) == b.CANCELLING


def test_a_fenced_out_leader_stores_nothing(db: Engine) -> None:
    batch_id = _batch(db, "batch_a")
    with pytest.raises(Fenced):
        bl.store_lines(db, batch_id=batch_id, lines=_lines(2), fence=fenced_out)
    assert _rows(db, batch_id) == []
    assert _status(db, batch_id) == b.VALIDATING


def test_refused_lines_are_stored_as_refuse_makes_them(db: Engine) -> None:
    batch_id = _batch(db, "batch_a")
    lines = [*_lines(1), bl.Line(1, "nul\x00id", "batch_req_1", "tiny", JOB), *_lines(3)[2:]]
    with pytest.raises((DataError, ValueError)):
        bl.store_lines(db, batch_id=batch_id, lines=lines)

    def refuse(line: bl.Line, exc: Exception) -> bl.Line:
        return bl.Line(line.line, "refused", line.request_id, line.model, None, {"why": "x"})

    assert bl.store_lines(db, batch_id=batch_id, lines=lines, refuse=refuse) == 1
    rows = _rows(db, batch_id)
    assert [(r.custom_id, r.state) for r in rows] == [
        ("c-0", b.PENDING),
        ("refused", b.FAILED),
        ("c-2", b.PENDING),
    ]
    assert rows[1].result == {"why": "x"}


# -- queueing and claiming ------------------------------------------------------


def test_queue_lines_takes_pending_lines_of_running_batches_oldest_first(db: Engine) -> None:
    _batch(db, "batch_old", age=60)
    bl.store_lines(db, batch_id="batch_old", lines=_lines(2), fence=lead)
    _stored(db, "batch_new", 2)
    _stored(db, "batch_other", 2, model="other")
    _stored(db, "batch_waiting", 1)
    with db.begin() as conn:
        query = update(BATCHES).where(BATCHES.c.id == "batch_waiting")
        conn.execute(query.values(status=b.CANCELLING))
    assert bl.queue_lines(db, model="tiny", chunk="c1", take=3, lease=30, fence=lead) == 3
    queued = [(r.line, r.chunk) for r in _rows(db, "batch_old") + _rows(db, "batch_new")]
    assert queued == [(0, "c1"), (1, "c1"), (0, "c1"), (1, None)]
    assert all(r.lease_until > utcnow() for r in _rows(db, "batch_old"))
    assert bl.queue_lines(db, model="tiny", chunk="c2", take=3, lease=30, fence=lead) == 1
    assert bl.queue_lines(db, model="tiny", chunk="c3", take=3, lease=30, fence=lead) == 0
    assert [r.state for r in _rows(db, "batch_other")] == [b.PENDING] * 2
    assert [r.state for r in _rows(db, "batch_waiting")] == [b.PENDING]


def test_a_fenced_out_leader_queues_nothing(db: Engine) -> None:
    batch_id = _stored(db, "batch_a", 2)
    with pytest.raises(Fenced):
        bl.queue_lines(db, model="tiny", chunk="c1", take=2, lease=30, fence=fenced_out)
    assert [(r.state, r.chunk) for r in _rows(db, batch_id)] == [(b.PENDING, None)] * 2


def test_a_claimed_line_is_not_claimed_twice(db: Engine) -> None:
    batch_id = _stored(db, "batch_a", 2)
    bl.queue_lines(db, model="tiny", chunk="c1", take=2, lease=30, fence=lead)
    claimed = bl.claim_lines(db, chunk="c1", worker="w1", lease=30)
    assert sorted((bid, line) for bid, line, _ in claimed) == [(batch_id, 0), (batch_id, 1)]
    assert all(job == JOB for _, _, job in claimed)
    # The chunk's message delivered again, to another worker.
    assert bl.claim_lines(db, chunk="c1", worker="w2", lease=30) == []
    assert bl.claim_lines(db, chunk="c-unknown", worker="w2", lease=30) == []
    rows = _rows(db, batch_id)
    assert [(r.state, r.worker, r.attempts) for r in rows] == [(b.RUNNING, "w1", 1)] * 2


def test_renew_leases_extends_only_the_workers_running_lines(db: Engine) -> None:
    _running(db, "batch_a", 1, worker="w1")
    _running(db, "batch_b", 1, chunk="c2", worker="w2")
    soon = utcnow() + timedelta(seconds=1)
    _set(db, "batch_a", lease_until=soon)
    _set(db, "batch_b", lease_until=soon)
    bl.renew_leases(db, worker="w1", lease=60)
    assert _rows(db, "batch_a")[0].lease_until > utcnow() + timedelta(seconds=30)
    assert _rows(db, "batch_b")[0].lease_until == soon


# -- reclaiming -------------------------------------------------------------------


def test_reclaim_expired_puts_lapsed_lines_back_or_fails_them(db: Engine) -> None:
    _running(db, "batch_a", 3)
    past = utcnow() - timedelta(seconds=1)
    with db.begin() as conn:
        lines = LINES.c.batch_id == "batch_a"
        conn.execute(update(LINES).where(lines, LINES.c.line == 0).values(lease_until=past))
        conn.execute(
            update(LINES).where(lines, LINES.c.line == 1).values(lease_until=past, attempts=3)
        )
    with pytest.raises(Fenced):
        bl.reclaim_expired(db, max_attempts=3, fence=fenced_out)
    assert [r.state for r in _rows(db, "batch_a")] == [b.RUNNING] * 3
    assert bl.reclaim_expired(db, max_attempts=3, fence=lead) == (1, 1)
    back, lost, live = _rows(db, "batch_a")
    assert (back.state, back.chunk, back.worker, back.lease_until) == (b.PENDING, None, None, None)
    assert lost.state == b.FAILED and lost.result["status_code"] == 500
    assert lost.result["body"]["error"]["code"] == "worker_lost"
    assert live.state == b.RUNNING and live.chunk == "c1"


# -- writing results ------------------------------------------------------------


def _write(db: Engine, *results: bl.Result) -> set[tuple[str, int]]:
    with db.begin() as conn:
        return bl.write_results(conn, results=results, now=utcnow())


def test_a_stale_chunks_result_is_not_written(db: Engine) -> None:
    batch_id = "batch_a"
    _running(db, batch_id, 1, chunk="c-old", worker="w-old")
    # Its lease lapsed; the line went back, and on to another worker.
    _set(db, batch_id, lease_until=utcnow() - timedelta(seconds=1))
    bl.reclaim_expired(db, max_attempts=3, fence=lead)
    bl.queue_lines(db, model="tiny", chunk="c-new", take=1, lease=30, fence=lead)
    assert bl.claim_lines(db, chunk="c-old", worker="w-old", lease=30) == []
    assert len(bl.claim_lines(db, chunk="c-new", worker="w-new", lease=30)) == 1
    assert _write(db, bl.Result(batch_id, 0, "c-old", b.DONE, {"stale": True})) == set()
    (row,) = _rows(db, batch_id)
    assert (row.state, row.result, row.worker) == (b.RUNNING, None, "w-new")
    assert _write(db, bl.Result(batch_id, 0, "c-new", b.DONE, {"ok": 1})) == {(batch_id, 0)}
    # Written again (a retry after a commit whose answer was lost): a no-op.
    assert _write(db, bl.Result(batch_id, 0, "c-new", b.FAILED, {"again": 1})) == set()
    (row,) = _rows(db, batch_id)
    assert (row.state, row.result, row.chunk, row.lease_until) == (b.DONE, {"ok": 1}, "c-new", None)
    assert row.finished_at is not None and row.attempts == 2


def test_a_line_handed_back_loses_its_chunk_and_the_attempt(db: Engine) -> None:
    batch_id = "batch_a"
    _running(db, batch_id, 2)
    written = _write(
        db, bl.Result(batch_id, 0, "c1", b.PENDING), bl.Result(batch_id, 1, "c1", b.CANCELLED)
    )
    assert written == {(batch_id, 0), (batch_id, 1)}
    back, cancelled = _rows(db, batch_id)
    assert (back.state, back.chunk, back.attempts, back.finished_at) == (b.PENDING, None, 0, None)
    assert (cancelled.state, cancelled.chunk, cancelled.attempts) == (b.CANCELLED, "c1", 1)
    assert cancelled.finished_at is not None
    # Its old chunk's message finds nothing to claim.
    assert bl.claim_lines(db, chunk="c1", worker="w1", lease=30) == []


# -- ending a batch's lines -------------------------------------------------------


def _mixed(db: Engine, batch_id: str) -> None:
    """Line 0 pending, 1 queued, 2 running, 3 done."""
    _stored(db, batch_id, 4)
    bl.queue_lines(db, model="tiny", chunk="c1", take=3, lease=30, fence=lead)
    moves: list[dict[str, Any]] = [
        {"state": b.PENDING, "chunk": None, "lease_until": None},
        {},
        {"state": b.RUNNING, "worker": "w1"},
        {"state": b.DONE},
    ]
    with db.begin() as conn:
        for line, values in enumerate(moves):
            if values:
                where = (LINES.c.batch_id == batch_id, LINES.c.line == line)
                conn.execute(update(LINES).where(*where).values(**values))


def test_cancel_and_fail_end_only_the_lines_no_worker_started(db: Engine) -> None:
    _mixed(db, "batch_a")
    _mixed(db, "batch_b")
    with db.begin() as conn:
        bl.cancel_lines(conn, batch_id="batch_a", now=utcnow())
        bl.fail_lines(conn, batch_id="batch_b", result={"why": 1}, now=utcnow())
    ended = [(r.state, r.lease_until) for r in _rows(db, "batch_a")[:2]]
    assert ended == [(b.CANCELLED, None)] * 2
    assert [r.state for r in _rows(db, "batch_a")[2:]] == [b.RUNNING, b.DONE]
    failed = _rows(db, "batch_b")
    assert [(r.state, r.result) for r in failed[:2]] == [(b.FAILED, {"why": 1})] * 2
    assert [r.state for r in failed[2:]] == [b.RUNNING, b.DONE]


def test_expire_ends_every_live_line(db: Engine) -> None:
    _mixed(db, "batch_a")
    with db.begin() as conn:
        bl.expire_lines(conn, batch_id="batch_a", now=utcnow())
    rows = _rows(db, "batch_a")
    assert [r.state for r in rows] == [b.EXPIRED] * 3 + [b.DONE]
    assert all(r.lease_until is None and r.finished_at is not None for r in rows[:3])
    # A result the worker still sends for its running line is not written.
    assert _write(db, bl.Result("batch_a", 2, "c1", b.DONE, {"late": 1})) == set()


# -- reads --------------------------------------------------------------------------


def test_reads(db: Engine) -> None:
    _mixed(db, "batch_a")
    _stored(db, "batch_b", 1, model="other")
    assert reads.live_count(db, batch_id="batch_a") == 3
    assert reads.inflight_count(db, model="tiny") == 2
    assert sorted(reads.waiting_models(db)) == ["other", "tiny"]
    assert reads.batch_models(db, batch_id="batch_b") == ["other"]
    counts = reads.counts(db, batch_ids=["batch_a", "batch_none"])
    assert counts == {
        "batch_a": {b.PENDING: 1, b.QUEUED: 1, b.RUNNING: 1, b.DONE: 1},
        "batch_none": {},
    }
    assert reads.counts(db, batch_ids=[]) == {}
    page = reads.result_page(db, batch_id="batch_a", states=(b.PENDING, b.DONE), after=0, limit=5)
    assert [(r.line, r.custom_id, r.state) for r in page] == [(3, "c-3", b.DONE)]
