"""The batch-line state machine: every write to `batch_lines`, as named
transitions that the API's batch scheduler and the workers' bulk runner both
call (they never import each other, so it lives here); the reads are in
schemas.batch_line_reads.

A line moves pending -> queued -> running -> done | failed, or to cancelled |
expired; a line whose lease lapses goes back to pending (or fails once lost
too often). Two guards make every result land exactly once:

- the fence: each transaction of the scheduler starts with `fence(conn)`,
  which raises when a newer leader took over, so a stalled leader commits
  nothing beside its successor;
- the chunk and the lease: a line is queued under a fresh `chunk`, claimed
  only while still queued under that chunk, and finished only while still
  running under it, so a worker whose lease lapsed (the line went back, and
  on to another worker) finds nothing to claim or to write.

Functions taking `db` run a transaction of their own (fenced first where a
`fence` is given); those taking `conn` are steps of the caller's transaction,
for callers that change the batch record or usage rows in the same commit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, tuple_, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from schemas import batches as b
from schemas.events import error_body
from schemas.tables import BATCH_LINES as LINES
from schemas.tables import BATCHES, utcnow

# Called first in a transaction of the batch scheduler: raises when this
# process is no longer the leader (the scheduler's leadership check).
Fence = Callable[[Connection], None]

# Rows per INSERT when a batch's lines are stored.
INSERT_ROWS = 1000

# The lines of the in-flight states: on the bulk queue or on a worker.
INFLIGHT = (b.QUEUED, b.RUNNING)
# The lines no worker has started: cancelling or failing a batch ends them.
WAITING = (b.PENDING, b.QUEUED)


@dataclass
class Line:
    """A line as validation produced it, to be stored: the job a worker runs,
    or (job None) the answer it already got in `result`."""

    line: int
    custom_id: str
    request_id: str
    model: str
    job: dict[str, Any] | None
    result: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        return b.PENDING if self.job is not None else b.FAILED


@dataclass(frozen=True)
class Result:
    """How a worker ended one line it ran under `chunk`: a final state with
    its result, or pending for a line handed back unrun (shutting down)."""

    batch_id: str
    line: int
    chunk: str
    state: str
    result: dict[str, Any] | None = None


# -- storing ---------------------------------------------------------------------


def _row(batch_id: str, line: Line, now: datetime) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "line": line.line,
        "custom_id": line.custom_id,
        "request_id": line.request_id,
        "model": line.model,
        "job": line.job,
        "state": line.state,
        "attempts": 0,
        "result": line.result,
        "finished_at": None if line.job is not None else now,
    }


def _outage(exc: Exception) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def store_lines(
    db: Engine,
    *,
    batch_id: str,
    lines: Sequence[Line],
    fence: Fence | None = None,
    refuse: Callable[[Line, Exception], Line] | None = None,
) -> int:
    """(none) -> pending, or failed for lines rejected while validating; and
    the batch validating -> in_progress. One transaction that first deletes
    the batch's lines: a crash halfway leaves the batch validating, and
    validation starts over without duplicates; the batch moves only from
    validating, so a second store cannot restart a running batch.

    `refuse`: each line in a savepoint of its own, and a line the database
    refuses (a value validation did not foresee) is stored as `refuse` makes
    it instead; for a second try after the fast path raised. Returns how many
    lines were refused."""
    now = utcnow()
    refused = 0
    with db.begin() as conn:
        if fence is not None:
            fence(conn)
        conn.execute(LINES.delete().where(LINES.c.batch_id == batch_id))
        if refuse is not None:
            for line in lines:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(LINES), [_row(batch_id, line, now)])
                except Exception as exc:
                    # An outage is not a refusal: let it fail the pass.
                    if _outage(exc):
                        raise
                    refused += 1
                    conn.execute(insert(LINES), [_row(batch_id, refuse(line, exc), now)])
        else:
            for start in range(0, len(lines), INSERT_ROWS):
                rows = [_row(batch_id, line, now) for line in lines[start : start + INSERT_ROWS]]
                conn.execute(insert(LINES), rows)
        conn.execute(
            update(BATCHES)
            .where(BATCHES.c.id == batch_id, BATCHES.c.status == b.VALIDATING)
            .values(status=b.IN_PROGRESS, in_progress_at=now)
        )
    return refused


# -- the scheduler's moves ------------------------------------------------------


def queue_lines(
    db: Engine, *, model: str, chunk: str, take: int, lease: float, fence: Fence
) -> int:
    """pending -> queued under `chunk`, leased for `lease` seconds: up to
    `take` lines of `model` in running batches, oldest batch first. Fenced;
    the picked rows are locked (SKIP LOCKED) until the commit, so no line is
    queued in two chunks. Returns how many lines were queued (0: none left)."""
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
    lease_until = utcnow() + timedelta(seconds=lease)
    queue = (
        update(LINES)
        .where(LINES.c.batch_id == bindparam("b_batch"), LINES.c.line == bindparam("b_line"))
        .values(state=b.QUEUED, chunk=chunk, lease_until=lease_until)
    )
    with db.begin() as conn:
        fence(conn)
        picked = conn.execute(pick).all()
        if picked:
            conn.execute(queue, [{"b_batch": bid, "b_line": line} for bid, line in picked])
    return len(picked)


def reclaim_expired(db: Engine, *, max_attempts: int, fence: Fence) -> tuple[int, int]:
    """queued | running with a lapsed lease -> failed (worker_lost, a 500)
    once the line was claimed `max_attempts` times, else -> pending, losing
    its chunk and worker so the old chunk's message and the old holder find
    nothing of it. Fenced, one transaction. Returns (failed, back)."""
    now = utcnow()
    lapsed = (LINES.c.state.in_(INFLIGHT), LINES.c.lease_until < now)
    lost = b.http_result(
        500,
        error_body(
            f"the worker running this request was lost {max_attempts} times",
            type="server_error",
            code="worker_lost",
        ),
    )
    with db.begin() as conn:
        fence(conn)
        failed = conn.execute(
            update(LINES)
            .where(*lapsed, LINES.c.attempts >= max_attempts)
            .values(state=b.FAILED, result=lost, finished_at=now, lease_until=None)
        ).rowcount
        back = conn.execute(
            update(LINES)
            .where(*lapsed)
            .values(state=b.PENDING, chunk=None, worker=None, lease_until=None)
        ).rowcount
    return int(failed), int(back)


def _end(conn: Connection, batch_id: str, states: Sequence[str], **values: Any) -> None:
    conn.execute(
        update(LINES)
        .where(LINES.c.batch_id == batch_id, LINES.c.state.in_(states))
        .values(lease_until=None, **values)
    )


def cancel_lines(conn: Connection, *, batch_id: str, now: datetime) -> None:
    """pending | queued -> cancelled, in the caller's transaction (fenced, or
    with the batch moving to cancelling). A queued line's chunk then finds
    nothing to claim; running lines finish and keep their results."""
    _end(conn, batch_id, WAITING, state=b.CANCELLED, finished_at=now)


def fail_lines(conn: Connection, *, batch_id: str, result: dict[str, Any], now: datetime) -> None:
    """pending | queued -> failed with `result`, in the caller's transaction
    (the batch failing). Running lines finish; they are not written out."""
    _end(conn, batch_id, WAITING, state=b.FAILED, result=result, finished_at=now)


def expire_lines(conn: Connection, *, batch_id: str, now: datetime) -> None:
    """pending | queued | running -> expired, in the caller's (fenced)
    transaction. A running line's later result is not written: it is no
    longer running."""
    _end(conn, batch_id, b.LIVE_STATES, state=b.EXPIRED, finished_at=now)


# -- the worker's moves ---------------------------------------------------------


def claim_lines(
    db: Engine, *, chunk: str, worker: str, lease: float
) -> list[tuple[str, int, dict[str, Any]]]:
    """queued under `chunk` -> running on `worker`, leased for `lease` seconds,
    one more attempt; returns (batch_id, line, job) of each. One UPDATE ...
    RETURNING: a line is claimed once, and a chunk message delivered twice,
    or one whose lines were reclaimed and queued again under a new chunk,
    claims nothing."""
    claim = (
        update(LINES)
        .where(LINES.c.chunk == chunk, LINES.c.state == b.QUEUED)
        .values(
            state=b.RUNNING,
            worker=worker,
            lease_until=utcnow() + timedelta(seconds=lease),
            attempts=LINES.c.attempts + 1,
        )
        .returning(LINES.c.batch_id, LINES.c.line, LINES.c.job)
    )
    with db.begin() as conn:
        rows = conn.execute(claim).all()
    return [(r[0], r[1], r[2]) for r in rows]


def renew_leases(db: Engine, *, worker: str, lease: float) -> None:
    """The lease of every line running on `worker` extended to `lease` seconds
    from now; a worker that dies stops renewing and its lines are reclaimed."""
    with db.begin() as conn:
        conn.execute(
            update(LINES)
            .where(LINES.c.worker == worker, LINES.c.state == b.RUNNING)
            .values(lease_until=utcnow() + timedelta(seconds=lease))
        )


_FINISH = (
    update(LINES)
    .where(
        LINES.c.batch_id == bindparam("b_batch"),
        LINES.c.line == bindparam("b_line"),
        LINES.c.chunk == bindparam("b_chunk"),
        LINES.c.state == b.RUNNING,
    )
    .values(
        state=bindparam("b_state"),
        result=bindparam("b_result"),
        finished_at=bindparam("b_finished"),
        chunk=bindparam("b_new_chunk"),
        lease_until=None,
        # A line handed back on shutdown was not lost: that run does not
        # count against its attempts.
        attempts=LINES.c.attempts - bindparam("b_undo"),
    )
)


def write_results(
    conn: Connection, *, results: Sequence[Result], now: datetime
) -> set[tuple[str, int]]:
    """running under the result's chunk -> its state (done | failed |
    cancelled, finished at `now`), or -> pending for a line handed back, in
    the caller's transaction. The lines still running under these chunks are
    locked first and only those are written: one whose lease lapsed and went
    to another worker is not this one's to finish, and a result written again
    (a retry after a commit whose answer was lost) finds it no longer running.
    Returns the (batch_id, line) written, so the caller writes their usage
    rows in the same transaction, each line accounted once."""
    held = [(r.batch_id, r.line, r.chunk) for r in results]
    owned = {
        (row[0], row[1])
        for row in conn.execute(
            select(LINES.c.batch_id, LINES.c.line)
            .where(
                tuple_(LINES.c.batch_id, LINES.c.line, LINES.c.chunk).in_(held),
                LINES.c.state == b.RUNNING,
            )
            .with_for_update()
        )
    }
    rows = []
    for r in results:
        if (r.batch_id, r.line) not in owned:
            continue
        final = r.state != b.PENDING
        rows.append(
            {
                "b_batch": r.batch_id,
                "b_line": r.line,
                "b_chunk": r.chunk,
                "b_state": r.state,
                "b_result": r.result,
                "b_finished": now if final else None,
                # A line put back loses its chunk, so a stale message for
                # that chunk finds nothing to claim.
                "b_new_chunk": r.chunk if final else None,
                "b_undo": 0 if final else 1,
            }
        )
    if rows:
        conn.execute(_FINISH, rows)
    return owned
