"""Batches in the database: keyword-only data-access functions on a
synchronous engine (the API calls them in its thread pool, the scheduler on
its own thread)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from api.batches import protocol
from api.batches.validate import safe_text
from api.usage import store as usage_store
from schemas import batch_line_reads, batch_lines
from schemas import batches as b
from schemas.batch_lines import Fence, Line
from schemas.bounds import text_problem
from schemas.events import error_body
from schemas.tables import BATCHES, BatchRecord, aware, plausible_id, utcnow


def _ts(value: datetime | None) -> int | None:
    return int(aware(value).timestamp()) if value is not None else None


def create_batch(
    db: Engine,
    *,
    create: protocol.BatchCreate,
    owner: str | None = None,
    estimated_tokens: int = 0,
    check: Callable[[Session], None] | None = None,
) -> BatchRecord:
    """`check` runs in the insert's transaction first and may refuse it
    (api/accounts/batch_quota.py: the key's batch-token allowance)."""
    now = utcnow()
    record = BatchRecord(
        id=f"batch_{uuid.uuid4().hex}",
        created_at=now,
        endpoint=create.endpoint,
        input_file_id=create.input_file_id,
        completion_window=create.completion_window,
        expires_at=now + timedelta(seconds=b.window_seconds(create.completion_window)),
        status=b.VALIDATING,
        meta=create.metadata,
        owner=owner,
        estimated_tokens=estimated_tokens,
    )
    with Session(db, expire_on_commit=False) as session, session.begin():
        if check is not None:
            check(session)
        session.add(record)
    return record


def _visible(record: BatchRecord | None, owner_filter: str | None) -> BatchRecord | None:
    """`record` when the caller sees it (`owner_filter`: the only owner it
    sees, None for everything); another key's batch looks like a missing one."""
    if record is None or (owner_filter is not None and record.owner != owner_filter):
        return None
    return record


def get_batch(db: Engine, *, batch_id: str, owner_filter: str | None = None) -> BatchRecord | None:
    if not plausible_id(batch_id):
        return None
    with Session(db, expire_on_commit=False) as session:
        return _visible(session.get(BatchRecord, batch_id), owner_filter)


def list_batches(
    db: Engine, *, after: str | None = None, limit: int = 20, owner_filter: str | None = None
) -> tuple[list[BatchRecord], bool]:
    """Newest first; `after` is the id of the last batch of the previous page
    (ignored, like an unknown id, when the caller cannot see it);
    `owner_filter`: only that owner's batches (None: everyone's)."""
    query = select(BatchRecord).order_by(BatchRecord.created_at.desc(), BatchRecord.id.desc())
    if owner_filter is not None:
        query = query.where(BatchRecord.owner == owner_filter)
    with Session(db, expire_on_commit=False) as session:
        if after is not None and plausible_id(after):
            anchor = _visible(session.get(BatchRecord, after), owner_filter)
            if anchor is not None:
                query = query.where(
                    (BatchRecord.created_at < anchor.created_at)
                    | ((BatchRecord.created_at == anchor.created_at) & (BatchRecord.id < anchor.id))
                )
        rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def counts(db: Engine, *, batch_ids: Sequence[str]) -> dict[str, protocol.RequestCounts]:
    """request_counts: every line in the error file counts as failed."""
    out = {batch_id: protocol.RequestCounts() for batch_id in batch_ids}
    for batch_id, states in batch_line_reads.counts(db, batch_ids=batch_ids).items():
        c = out[batch_id]
        for state, n in states.items():
            c.total += n
            if state == b.DONE:
                c.completed += n
            elif state in (b.FAILED, b.EXPIRED, b.CANCELLED):
                c.failed += n
    return out


def usage(db: Engine, *, batch_ids: Sequence[str]) -> dict[str, protocol.BatchUsage]:
    """The Batch object's `usage`: its lines' usage rows summed (zeros for a
    batch none of whose lines has finished yet)."""
    out = {}
    for batch_id, sums in usage_store.batch_sums(db, batch_ids=batch_ids).items():
        out[batch_id] = protocol.BatchUsage(
            input_tokens=sums.prompt_tokens,
            input_tokens_details=protocol.InputTokensDetails(cached_tokens=sums.cached_tokens),
            output_tokens=sums.completion_tokens,
            total_tokens=sums.total_tokens,
        )
    return out


def batch_object(
    record: BatchRecord,
    request_counts: protocol.RequestCounts,
    usage: protocol.BatchUsage | None = None,
) -> protocol.BatchObject:
    return protocol.BatchObject(
        id=record.id,
        endpoint=record.endpoint,
        errors=record.errors,  # type: ignore[arg-type]
        input_file_id=record.input_file_id,
        completion_window=record.completion_window,
        status=record.status,
        output_file_id=record.output_file_id,
        error_file_id=record.error_file_id,
        created_at=_ts(record.created_at) or 0,
        in_progress_at=_ts(record.in_progress_at),
        expires_at=_ts(record.expires_at),
        finalizing_at=_ts(record.finalizing_at),
        completed_at=_ts(record.completed_at),
        failed_at=_ts(record.failed_at),
        expired_at=_ts(record.expired_at),
        cancelling_at=_ts(record.cancelling_at),
        cancelled_at=_ts(record.cancelled_at),
        request_counts=request_counts,
        metadata=record.meta,
        usage=usage or protocol.BatchUsage(),
    )


def set_status(
    db: Engine, *, batch_id: str, status: str, fence: Fence | None = None, **fields: Any
) -> None:
    stamp = {
        b.IN_PROGRESS: "in_progress_at",
        b.FINALIZING: "finalizing_at",
        b.COMPLETED: "completed_at",
        b.BATCH_FAILED: "failed_at",
        b.BATCH_EXPIRED: "expired_at",
        b.CANCELLING: "cancelling_at",
        b.BATCH_CANCELLED: "cancelled_at",
    }.get(status)
    values: dict[str, Any] = {"status": status, **fields}
    if stamp:
        values[stamp] = utcnow()
    with db.begin() as conn:
        if fence is not None:
            fence(conn)
        conn.execute(update(BATCHES).where(BATCHES.c.id == batch_id).values(**values))


def _refused(line: Line, exc: Exception) -> Line:
    """A line the database would not store, as a line that failed with a 400."""
    message = safe_text(f"the request holds a value the database cannot store: {exc}", 500)
    body = error_body(message, type="invalid_request_error", code="invalid_request_error")
    model = line.model if not text_problem(line.model) else ""
    custom_id = line.custom_id if not text_problem(line.custom_id) else safe_text(line.custom_id)
    return Line(line.line, custom_id, line.request_id, model, None, b.http_result(400, body))


def insert_lines(
    db: Engine,
    *,
    batch_id: str,
    lines: Sequence[Line],
    fence: Fence | None = None,
    careful: bool = False,
) -> int:
    """All of a batch's lines, then in_progress, in one transaction
    (schemas.batch_lines.store_lines).

    `careful`: each line on its own, and a line the database refuses (a
    value validation did not foresee) is stored as a line that failed with a
    400 instead; for a second try after the fast path raised. Returns how
    many lines were refused."""
    refuse = _refused if careful else None
    return batch_lines.store_lines(db, batch_id=batch_id, lines=lines, fence=fence, refuse=refuse)


def fail_batch(db: Engine, *, batch_id: str, reason: str, fence: Fence | None = None) -> bool:
    """A batch the scheduler could not move on: `failed`, with `reason` in its
    errors (code internal_error); its lines that have not reached a worker
    fail with a 500 too (those running finish, and are not written out).
    False when the batch had already ended."""
    now = utcnow()
    message = safe_text(reason, 1000)
    errors = {
        "object": "list",
        "data": [{"code": "internal_error", "message": message, "param": None, "line": None}],
    }
    result = b.http_result(500, error_body(message, type="server_error", code="internal_error"))
    with db.begin() as conn:
        if fence is not None:
            fence(conn)
        moved = conn.execute(
            update(BATCHES)
            .where(BATCHES.c.id == batch_id, BATCHES.c.status.in_(b.ACTIVE_STATUSES))
            .values(status=b.BATCH_FAILED, failed_at=now, errors=errors)
        ).rowcount
        if moved:
            batch_lines.fail_lines(conn, batch_id=batch_id, result=result, now=now)
    return bool(moved)


def request_cancel(db: Engine, *, batch_id: str) -> bool:
    """Cancelling: no line starts any more; those already on a worker finish.
    False when the batch is past cancelling (finished, failed, expired)."""
    now = utcnow()
    with db.begin() as conn:
        moved = conn.execute(
            update(BATCHES)
            .where(BATCHES.c.id == batch_id, BATCHES.c.status.in_((b.VALIDATING, b.IN_PROGRESS)))
            .values(status=b.CANCELLING, cancelling_at=now)
        ).rowcount
        if moved:
            batch_lines.cancel_lines(conn, batch_id=batch_id, now=now)
    return bool(moved)
