"""What every job a worker runs goes through, whatever its kind (generate,
embed): reading its payload, the claim that it may start, publishing on its
channel, reporting a failure, and its usage row."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis
from pydantic import ValidationError
from sqlalchemy import Engine

from schemas import keys
from schemas.accounts import JobAccount
from schemas.events import Accepted, Done, Embeddings, ErrorEvent, encode
from schemas.jobs import EmbedJob, GenerateJob
from schemas.ratelimit import settle
from schemas.registry import ModelConfig
from schemas.settings import get_settings
from workers.presence import claim
from workers.sink import reject_payload, report_failure
from workers.usage import record_usage

Job = TypeVar("Job", GenerateJob, EmbedJob)


class Context(Protocol):
    """What the job skeleton reads of a runtime (WorkerRuntime, EmbedRuntime)."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def redis(self) -> redis.Redis: ...

    @property
    def db(self) -> Engine: ...

    @property
    def worker_id(self) -> str: ...


def run_job(
    context: Context,
    payload: dict[str, Any],
    kind: type[Job],
    work: Callable[[Job], None],
    *,
    log: logging.Logger,
    label: str,
    failure: str,
) -> None:
    """Validate `payload` as a `kind` job and run `work` on it. A payload that
    does not validate is refused (a 400); a job that raises is reported as
    `failure: error` and raised again (Celery logs it)."""
    try:
        job = kind.model_validate(payload)
    except ValidationError as exc:
        reject_payload(context.redis, payload, exc)
        return
    try:
        work(job)
    except Exception as exc:
        # After Accepted the API waits on this worker, not on a timeout: every
        # failure must reach the client.
        log.exception("%s %s failed", label, job.request_id)
        report_failure(context.redis, job.request_id, f"{failure}: {exc}")
        raise


class Claim(enum.Enum):
    RUN = "run"
    # Its worker died before the client got anything; the API queued it again
    # under another id, so this copy is nobody's.
    REQUEUED = "requeued"
    # The client left while it was queued.
    CANCELLED = "cancelled"
    # A copy of it started already (a redelivered message).
    DUPLICATE = "duplicate"


def claim_job(context: Context, request_id: str) -> Claim:
    """Whether this job may start here (see workers.presence.claim)."""
    cancelled, first = claim(
        context.redis,
        request_id,
        context.worker_id,
        request_timeout=get_settings().request_timeout,
    )
    if cancelled == keys.CANCEL_REQUEUED:
        return Claim.REQUEUED
    if cancelled is not None:
        return Claim.CANCELLED
    return Claim.RUN if first else Claim.DUPLICATE


def publish(
    context: Context, request_id: str, event: Accepted | Done | ErrorEvent | Embeddings
) -> None:
    context.redis.publish(keys.stream_channel(request_id), encode(event))


class Account(Protocol):
    """Records the usage row of one job: its status, prompt and completion
    tokens, time to first token (ms) and the prompt tokens its slot reused
    from the KV cache."""

    def __call__(
        self,
        status: str,
        prompt: int,
        completion: int,
        ttft_ms: float | None,
        *,
        cached: int = 0,
    ) -> None: ...


def accounting(
    context: Context,
    *,
    request_id: str,
    endpoint: str,
    account: JobAccount | None = None,
) -> Account:
    """The usage recorder of a job starting now (its duration counts from
    here), charged to `account`'s key (None: auth is off, nobody's)."""
    started = time.perf_counter()
    key_id = account.key_id if account is not None else None

    def record(
        status: str,
        prompt: int,
        completion: int,
        ttft_ms: float | None,
        *,
        cached: int = 0,
    ) -> None:
        record_usage(
            context.db,
            request_id=request_id,
            model=context.config.name,
            endpoint=endpoint,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_ms=ttft_ms,
            duration_ms=(time.perf_counter() - started) * 1000,
            status=status,
            worker=context.worker_id,
            key_id=key_id,
            cached_tokens=cached,
        )
        # The key's token buckets get the real count (never raises).
        settle(context.redis, account, prompt + completion)

    return record
