"""The skeleton every job runs through (workers.job): the claim, a payload
that does not validate, and a job that raises (real Redis)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from schemas import keys
from schemas.events import ErrorEvent, decode
from schemas.jobs import EmbedJob
from workers.job import Claim, claim_job, run_job

log = logging.getLogger(__name__)


@pytest.fixture
def context(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)
    yield SimpleNamespace(config=None, redis=client, db=None, worker_id="w1")
    client.close()


def _id() -> str:
    return f"job-{uuid.uuid4().hex}"


def test_a_job_runs_once_unless_cancelled_or_requeued(context: Any) -> None:
    first = _id()
    assert claim_job(context, first) is Claim.RUN
    assert claim_job(context, first) is Claim.DUPLICATE
    cancelled, requeued = _id(), _id()
    context.redis.set(keys.cancel_key(cancelled), b"1")
    context.redis.set(keys.cancel_key(requeued), keys.CANCEL_REQUEUED)
    assert claim_job(context, cancelled) is Claim.CANCELLED
    assert claim_job(context, requeued) is Claim.REQUEUED


def _events(context: Any, request_id: str, action: Any) -> list[object]:
    pubsub = context.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.stream_channel(request_id))
    pubsub.get_message(timeout=1.0)  # the subscription itself
    try:
        action()
    finally:
        events = []
        while (message := pubsub.get_message(timeout=0.5)) is not None:
            events.append(decode(message["data"]))
        pubsub.close()
    return events


def test_an_unreadable_payload_is_a_400_and_the_job_does_not_run(context: Any) -> None:
    request_id = _id()
    ran: list[object] = []
    payload = {"request_id": request_id, "model": "m", "kind": "nonsense"}

    def go() -> None:
        run_job(context, payload, EmbedJob, ran.append, log=log, label="job", failure="it failed")

    [event] = _events(context, request_id, go)
    assert not ran
    assert isinstance(event, ErrorEvent) and event.status == 400


def test_a_job_that_raises_is_reported_and_raised(context: Any) -> None:
    request_id = _id()

    def work(job: EmbedJob) -> None:
        raise RuntimeError("boom")

    def go() -> None:
        with pytest.raises(RuntimeError):
            run_job(
                context,
                {"request_id": request_id, "model": "m"},
                EmbedJob,
                work,
                log=log,
                label="job",
                failure="it failed",
            )

    [event] = _events(context, request_id, go)
    assert isinstance(event, ErrorEvent) and event.message == "it failed: boom"
