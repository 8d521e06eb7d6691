"""A key's batch-token allowance, checked when a batch is created: the
estimated prompt tokens of the key's enqueued batches (validating,
in_progress, finalizing) plus the new one's may not exceed it, so a batch
over the allowance is a 429 at create, not a failure hours later. A batch
that is cancelling, cancelled or ends gives its share back by leaving those
statuses.

The estimate is the characters of each line's `prompt`, `messages` and
`input` divided by four (the rule interactive admission uses, see
api/accounts/limits.py), read from the input file one stored chunk at a
time. It is made only for a key with an allowance: nothing else reads it,
and a 200 MB file costs seconds of the API's CPU to read.

The check and the insert share one transaction that first locks the key's
row (SELECT ... FOR UPDATE on Postgres; on SQLite a write to the row takes
the database's write lock), so two concurrent creates cannot both fit."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from api.accounts.limits import CHARS_PER_TOKEN, text_chars
from api.accounts.principal import Principal
from api.batches import protocol, store
from api.errors import APIError
from api.files import store as files_store
from api.metrics.instruments import RATE_LIMITED
from schemas import batches as b
from schemas.tables import ApiKey, BatchRecord

log = logging.getLogger(__name__)

# Statuses whose batches hold their estimate of the allowance.
ENQUEUED = (b.VALIDATING, b.IN_PROGRESS, b.FINALIZING)
# A line longer than this is not parsed but counted at its length / 4 (an
# overestimate: the line's JSON syntax counts too), so memory stays bounded
# whatever the file holds.
MAX_PARSED_LINE = 4 * 1024 * 1024
# The request fields whose text is the prompt.
PROMPT_FIELDS = ("prompt", "messages", "input")


def line_tokens(line: bytes) -> int:
    """The estimated prompt tokens of one input line; a line that is not a
    request object counts at its length (the validator will fail it)."""
    try:
        parsed: Any = json.loads(line)
    except ValueError:
        return math.ceil(len(line) / CHARS_PER_TOKEN)
    body = parsed.get("body") if isinstance(parsed, dict) else None
    if not isinstance(body, dict):
        return 0
    chars = sum(text_chars(body.get(name)) for name in PROMPT_FIELDS)
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_chunks(chunks: Iterable[bytes]) -> int:
    """The estimated prompt tokens of a JSONL file given as byte chunks."""
    total = 0
    pending = bytearray()
    # Bytes of an over-long line seen so far (counted raw, not kept).
    overflow = 0
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if overflow:
                overflow += len(piece)
            elif len(pending) + len(piece) > MAX_PARSED_LINE:
                overflow = len(pending) + len(piece)
                pending.clear()
            else:
                pending += piece
            if end < 0:
                break
            total += _finish(pending, overflow)
            pending.clear()
            overflow = 0
            start = end + 1
    return total + _finish(pending, overflow)


def _finish(pending: bytearray, overflow: int) -> int:
    if overflow:
        return math.ceil(overflow / CHARS_PER_TOKEN)
    if not pending.strip():
        return 0
    return line_tokens(bytes(pending))


def estimate_file(db: Engine, *, file_id: str) -> int:
    return estimate_chunks(files_store.iter_content(db, file_id=file_id))


def enqueued_tokens(session: Session, key_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(BatchRecord.estimated_tokens), 0)).where(
            BatchRecord.owner == key_id, BatchRecord.status.in_(ENQUEUED)
        )
    )
    return int(total or 0)


def _locked_allowance(session: Session, key_id: str) -> int | None:
    """The key's allowance, read under a lock on its row that the caller's
    transaction holds until it commits."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite has no row locks; this write takes the database's write lock
        # (and starts the transaction: pysqlite begins one only before a write).
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(name=ApiKey.name))
        query = select(ApiKey.batch_tokens).where(ApiKey.id == key_id)
    else:
        query = select(ApiKey.batch_tokens).where(ApiKey.id == key_id).with_for_update()
    return session.execute(query).scalar_one_or_none()


def over_allowance(enqueued: int, allowance: int, estimate: int) -> APIError:
    return APIError(
        429,
        f"Batch token allowance exceeded: this key has {enqueued} tokens enqueued in batches, "
        f"its allowance is {allowance} tokens, and this batch is estimated at {estimate} "
        "tokens. Cancel a batch or wait for one to finish, then try again.",
        code="rate_limit_exceeded",
        type="tokens",
    )


def _check(key_id: str, estimate: int) -> Callable[[Session], None]:
    def check(session: Session) -> None:
        allowance = _locked_allowance(session, key_id)
        if allowance is None:
            return
        enqueued = enqueued_tokens(session, key_id)
        if enqueued + estimate > allowance:
            log.info("batch allowance: refused a batch of about %d tokens", estimate)
            RATE_LIMITED.labels(kind="batch_tokens").inc()
            raise over_allowance(enqueued, allowance, estimate)

    return check


def create_batch(db: Engine, *, create: protocol.BatchCreate, principal: Principal) -> BatchRecord:
    """store.create_batch for `principal`, within its key's allowance: a 429
    `rate_limit_exceeded` when the batch does not fit. Run in a thread."""
    key = principal.key
    if key is None or key.batch_tokens is None:
        return store.create_batch(db, create=create, owner=principal.key_id)
    estimate = estimate_file(db, file_id=create.input_file_id)
    return store.create_batch(
        db,
        create=create,
        owner=key.id,
        estimated_tokens=estimate,
        check=_check(key.id, estimate),
    )
