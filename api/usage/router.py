"""GET /v1/usage: sums of the usage rows (one per request and per batch
line) over a time range, grouped by day, model, key and/or endpoint.

A key sees only its own rows; an admin key (or anyone while auth is off)
sees every key's, and may narrow them with `key_id`. A non-admin key that
names another key's id gets no rows (an empty answer, as for a key that
does not exist: whether it exists is not revealed)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.accounts.principal import PrincipalDep
from api.deps import DbDep
from api.errors import APIError
from api.routing import StrictJSONRoute
from api.usage import store
from api.usage.protocol import UsageBucket, UsagePage, UsageResult
from schemas.tables import plausible_id

router = APIRouter(tags=["usage"], route_class=StrictJSONRoute)

# OpenAI's names for the same groups.
_ALIASES = {"api_key_id": "key", "key_id": "key", "models": "model"}
_NUMBER = re.compile(r"\d{1,12}(\.\d*)?")
# Within these years a timestamp is one the database and datetime both take.
_YEARS = (1970, 9999)
DAY = 86400


def parse_time(value: str | None, param: str) -> datetime | None:
    """Unix seconds, an ISO date (midnight UTC) or an ISO datetime (UTC when
    it names no zone); None when absent. APIError (400) otherwise."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if _NUMBER.fullmatch(text):
            return datetime.fromtimestamp(float(text), UTC)
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        when = None
    if when is None or not _YEARS[0] <= when.year <= _YEARS[1]:
        raise APIError(
            400,
            f"{param} must be unix seconds or an ISO 8601 date or time (got {text[:40]!r})",
            param=param,
        )
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _split(values: Iterable[str] | None) -> list[str]:
    """Values of a parameter given more than once or comma-separated."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def parse_groups(values: Iterable[str] | None) -> list[str]:
    groups = []
    for name in _split(values):
        group = _ALIASES.get(name.lower(), name.lower())
        if group not in store.GROUPS:
            raise APIError(
                400,
                f"group_by must be among {', '.join(store.GROUPS)} (got {name[:40]!r})",
                param="group_by",
            )
        if group not in groups:
            groups.append(group)
    return groups


def _result(group: store.Group) -> UsageResult:
    sums = group.sums
    return UsageResult(
        model=group.model,
        api_key_id=group.key_id,
        endpoint=group.endpoint,
        num_model_requests=sums.requests,
        input_tokens=sums.prompt_tokens,
        input_cached_tokens=sums.cached_tokens,
        output_tokens=sums.completion_tokens,
        total_tokens=sums.total_tokens,
    )


def _timestamp(when: datetime | None, default: int) -> int:
    return int(when.timestamp()) if when is not None else default


def buckets(
    groups: list[store.Group], *, by_day: bool, start: datetime | None, end: datetime | None
) -> list[UsageBucket]:
    """By day: one bucket per UTC day that has rows (days without any are
    left out), in order. Otherwise one bucket over the range asked for
    (from 0 and up to now where a bound was left open)."""
    if not by_day:
        span_end = _timestamp(end, math.ceil(time.time()))
        return [
            UsageBucket(
                start_time=_timestamp(start, 0),
                end_time=span_end,
                results=[_result(g) for g in groups],
            )
        ]
    days: dict[date, list[UsageResult]] = {}
    for group in groups:
        assert group.day is not None
        days.setdefault(group.day, []).append(_result(group))
    out = []
    for day, results in sorted(days.items()):
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
        out.append(
            UsageBucket(
                start_time=int(midnight.timestamp()),
                end_time=int((midnight + timedelta(days=1)).timestamp()),
                results=results,
            )
        )
    return out


@router.get("/v1/usage", response_model=UsagePage)
async def usage(
    principal: PrincipalDep,
    db: DbDep,
    start: str | None = None,
    end: str | None = None,
    group_by: Annotated[list[str] | None, Query()] = None,
    key_id: Annotated[list[str] | None, Query()] = None,
) -> UsagePage:
    since = parse_time(start, "start")
    until = parse_time(end, "end")
    if since is not None and until is not None and until <= since:
        raise APIError(400, "end must be after start", param="end")
    groups = parse_groups(group_by)
    named = _split(key_id)
    # An id that could not be one of ours (a NUL, 10 kB of junk) matches
    # nothing, like an unknown one; naming only such ids yields no rows.
    key_ids = [k for k in named if plausible_id(k)] if named else None
    found = await run_in_threadpool(
        store.usage_groups,
        db,
        start=since,
        end=until,
        group_by=groups,
        key_ids=key_ids,
        owner=principal.owner_filter,
    )
    return UsagePage(data=buckets(found, by_day="day" in groups, start=since, end=until))
