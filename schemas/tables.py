"""SQLAlchemy tables; Alembic reads `Base.metadata` from here."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def plausible_id(value: str) -> bool:
    """Whether `value` could be one of our ids. Anything else (a NUL byte,
    which Postgres refuses in text, or 10 kB of junk) is simply not found."""
    return bool(_ID.match(value))


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class UsageRecord(Base):
    """One row per finished request (completed, failed or cancelled)."""

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    request_id: Mapped[str] = mapped_column(String(96))
    model: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(32))
    # Which worker process served it (host-pid-suffix).
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The API key that made the request (None: made while auth was off).
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Prompt tokens served from the KV cache instead of evaluated.
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Set for the row of a batch line.
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index("ix_usage_created_at", "created_at"),
        Index("ix_usage_key_created_at", "key_id", "created_at"),
        Index("ix_usage_batch_id", "batch_id"),
        Index("ix_usage_model_created_at", "model", "created_at"),
        # One row per request: writers insert with ON CONFLICT DO NOTHING, so
        # a retried flush or a redelivered job never counts twice.
        Index("ux_usage_request_id", "request_id", unique=True),
    )


class FileRecord(Base):
    """An uploaded or generated file (OpenAI Files API). Its bytes live in
    `file_chunks`, so a 200 MB file is written and read piece by piece."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # "uploaded" while chunks are still being written, then "processed".
    status: Mapped[str] = mapped_column(String(16), default="processed")
    # The API key that uploaded it, or whose batch wrote it (None: auth off).
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (
        Index("ix_files_created_at", "created_at"),
        Index("ix_files_owner_created_at", "owner", "created_at"),
    )


class FileChunk(Base):
    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class BatchRecord(Base):
    """One bulk job (OpenAI Batches API). Its request counts are computed from
    its lines, so workers never contend for this row."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default="validating")
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The API key that created it (None: auth off); its output files and
    # usage rows belong to the same key.
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Prompt tokens estimated from the input file at create: what the batch
    # holds of its key's batch-token allowance until it ends.
    estimated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        Index("ix_batches_created_at", "created_at"),
        Index("ix_batches_owner_created_at", "owner", "created_at"),
        Index("ix_batches_status", "status"),
    )


class BatchLine(Base):
    """One request of a batch. Its state moves pending -> queued (in a chunk on
    the bulk queue, leased) -> running (claimed by a worker, lease renewed) ->
    done | failed, or to cancelled | expired. A result is written only by the
    holder of the line's current lease, so each line lands exactly once."""

    __tablename__ = "batch_lines"

    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(255))
    # The job payload a worker runs (schemas.jobs); None when the line was
    # rejected during validation.
    job: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    chunk: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # done / failed: what the worker or the validator produced (see batch_results).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_batch_lines_batch_state", "batch_id", "state"),
        Index("ix_batch_lines_state_model", "state", "model"),
        Index("ix_batch_lines_chunk", "chunk"),
    )


class BatchSchedulerEpoch(Base):
    """The fencing token of the batch scheduler's leader (a single row).

    A process that wins the Redis lock bumps `epoch` and keeps the value; every
    transaction the scheduler commits first checks that the row still holds
    it. A leader whose lock lapsed (a stall longer than its TTL) finds a newer
    epoch there and its transaction rolls back, so two leaders never both
    move batches."""

    __tablename__ = "batch_scheduler"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """An API key. The secret is stored only as its SHA-256 (a key is 256
    random bits, so a fast hash is safe; a password hash would only slow every
    request). `id` is the public part of the key and what everything a key
    owns points to; rotating a key replaces the secret and keeps the id."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    secret_hash: Mapped[str] = mapped_column(String(64))
    # The key's first and last characters, to recognise it in a list.
    hint: Mapped[str] = mapped_column(String(64))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Limits (None: unlimited): requests and tokens per minute, batch prompt
    # tokens enqueued at once, the models it may use, and windows per model
    # (schemas.accounts.QuotaRule as JSON).
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    batch_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    quotas: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


# Core handles for bulk statements (executemany updates, RETURNING).
BATCH_LINES = cast(Table, BatchLine.__table__)
BATCHES = cast(Table, BatchRecord.__table__)
USAGE = cast(Table, UsageRecord.__table__)
SCHEDULER_EPOCH = cast(Table, BatchSchedulerEpoch.__table__)
API_KEYS = cast(Table, ApiKey.__table__)
