"""Usage rows summed: keyword-only data-access functions on a synchronous
engine (the API calls them in its thread pool). Every sum is one GROUP BY
over the `usage` table; the (key_id, created_at) and (model, created_at)
indexes serve the filters a key and an admin use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, select

from schemas.tables import USAGE

# What a query may group by, in the order the groups are reported.
GROUPS = ("day", "model", "key", "endpoint")


@dataclass(frozen=True)
class Sums:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Group:
    """The sums of one group; a field not grouped by is None (and so is
    `key_id` for rows made while auth was off)."""

    sums: Sums
    day: date | None = None
    model: str | None = None
    key_id: str | None = None
    endpoint: str | None = None


def _day(dialect: str) -> ColumnElement[Any]:
    # The UTC calendar day of a row; Postgres stores timestamptz, SQLite text.
    if dialect == "postgresql":
        return func.date_trunc("day", func.timezone("UTC", USAGE.c.created_at))
    return func.date(USAGE.c.created_at)


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _sums(row: Any) -> Sums:
    return Sums(
        requests=int(row.requests or 0),
        prompt_tokens=int(row.prompt_tokens or 0),
        completion_tokens=int(row.completion_tokens or 0),
        cached_tokens=int(row.cached_tokens or 0),
    )


_TOTALS = (
    func.count().label("requests"),
    func.sum(USAGE.c.prompt_tokens).label("prompt_tokens"),
    func.sum(USAGE.c.completion_tokens).label("completion_tokens"),
    func.sum(USAGE.c.cached_tokens).label("cached_tokens"),
)


def usage_groups(
    db: Engine,
    *,
    start: datetime | None,
    end: datetime | None,
    group_by: Sequence[str] = (),
    key_ids: Sequence[str] | None = None,
    owner: str | None = None,
) -> list[Group]:
    """The sums of the rows created in [start, end), one Group per
    combination of `group_by` values that has rows (ordered by them); with
    no `group_by`, one Group of everything (zeros when nothing matched).

    `owner`: only that key's rows (a non-admin caller); None: every key's.
    `key_ids`: only those keys' rows (an admin's filter); with `owner` as
    well, only rows that are both, so another key's id yields nothing."""
    unknown = set(group_by) - set(GROUPS)
    if unknown:
        raise ValueError(f"cannot group by {', '.join(sorted(unknown))}")
    wanted = [g for g in GROUPS if g in group_by]
    columns: dict[str, ColumnElement[Any]] = {
        "day": _day(db.dialect.name),
        "model": USAGE.c.model,
        "key": USAGE.c.key_id,
        "endpoint": USAGE.c.endpoint,
    }
    keys = [columns[g].label(g) for g in wanted]
    query = select(*keys, *_TOTALS)
    if start is not None:
        query = query.where(USAGE.c.created_at >= start)
    if end is not None:
        query = query.where(USAGE.c.created_at < end)
    if owner is not None:
        query = query.where(USAGE.c.key_id == owner)
    if key_ids is not None:
        query = query.where(USAGE.c.key_id.in_(list(key_ids)))
    if keys:
        query = query.group_by(*keys).order_by(*keys)
    with db.connect() as conn:
        rows = conn.execute(query).all()
    out = []
    for row in rows:
        values = row._mapping
        out.append(
            Group(
                _sums(row),
                day=_as_date(values["day"]) if "day" in wanted else None,
                model=values["model"] if "model" in wanted else None,
                key_id=values["key"] if "key" in wanted else None,
                endpoint=values["endpoint"] if "endpoint" in wanted else None,
            )
        )
    return out


def batch_sums(db: Engine, *, batch_ids: Sequence[str]) -> dict[str, Sums]:
    """The sums of each batch's line rows (every batch asked for is there)."""
    out = {batch_id: Sums() for batch_id in batch_ids}
    if not batch_ids:
        return out
    query = (
        select(USAGE.c.batch_id, *_TOTALS)
        .where(USAGE.c.batch_id.in_(list(batch_ids)))
        .group_by(USAGE.c.batch_id)
    )
    with db.connect() as conn:
        for row in conn.execute(query):
            out[row.batch_id] = _sums(row)
    return out
