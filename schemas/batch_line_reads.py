"""Reads of the batch lines (schemas.batch_lines holds the transitions):
what the scheduler and the Batches API count and write out. Plain reads, no
locks: a count may be a moment old, and the callers act on it only through
the guarded transitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, func, select

from schemas import batches as b
from schemas.batch_lines import INFLIGHT
from schemas.tables import BATCH_LINES as LINES
from schemas.tables import BATCHES


def live_count(db: Engine, *, batch_id: str) -> int:
    """The batch's lines not final yet (pending, queued or running)."""
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    LINES.c.batch_id == batch_id, LINES.c.state.in_(b.LIVE_STATES)
                )
            ).scalar_one()
        )


def inflight_count(db: Engine, *, model: str) -> int:
    """Lines of `model` queued or running, across batches."""
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(LINES.c.model == model, LINES.c.state.in_(INFLIGHT))
            ).scalar_one()
        )


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


def batch_models(db: Engine, *, batch_id: str) -> list[str]:
    """The models a batch's lines run on."""
    with db.connect() as conn:
        query = select(LINES.c.model).distinct().where(LINES.c.batch_id == batch_id)
        rows = conn.execute(query)
        return [r[0] for r in rows if r[0]]


def counts(db: Engine, *, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per batch, how many of its lines are in each state (states without
    lines left out)."""
    out: dict[str, dict[str, int]] = {batch_id: {} for batch_id in batch_ids}
    if not batch_ids:
        return out
    query = (
        select(LINES.c.batch_id, LINES.c.state, func.count())
        .where(LINES.c.batch_id.in_(batch_ids))
        .group_by(LINES.c.batch_id, LINES.c.state)
    )
    with db.connect() as conn:
        for batch_id, state, n in conn.execute(query):
            out[batch_id][state] = int(n)
    return out


def result_page(
    db: Engine, *, batch_id: str, states: Sequence[str], after: int, limit: int
) -> Sequence[Any]:
    """Up to `limit` of the batch's lines in `states` past line `after`, in
    line order, with what writing them out needs."""
    query = (
        select(
            LINES.c.line,
            LINES.c.custom_id,
            LINES.c.request_id,
            LINES.c.model,
            LINES.c.job,
            LINES.c.state,
            LINES.c.result,
            LINES.c.finished_at,
        )
        .where(LINES.c.batch_id == batch_id, LINES.c.line > after, LINES.c.state.in_(states))
        .order_by(LINES.c.line)
        .limit(limit)
    )
    with db.connect() as conn:
        return conn.execute(query).all()
