"""Backpressure: a stalled worker (SIGSTOP) lets interactive jobs pile up in
its model's queue; past INFERQ_MAX_QUEUE_DEPTH a new request is refused at
once with a 503, Retry-After and nothing enqueued; once the worker runs
again every accepted request is answered and new ones are served."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from schemas import keys
from tests.support.procs import free_port, inferq, stop, wait_status
from tests.support.stack import MODEL, Stack

pytestmark = pytest.mark.timeout(180)

DEPTH = 2
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Paused:
    url: str
    redis_url: str
    worker_pgid: int


@pytest.fixture
def own_stack(stack: Stack, other_redis_url: str) -> Iterator[Paused]:
    """An API and a worker of their own on another Redis database, so the
    session stack's worker never takes these jobs."""
    port = free_port()
    env = {
        **stack.env,
        "REDIS_URL": other_redis_url,
        "INFERQ_PORT": str(port),
        "INFERQ_BATCH_SCHEDULER": "false",
        "INFERQ_MAX_QUEUE_DEPTH": str(DEPTH),
        # The worker is stopped while requests pile up, one a second: with
        # the default 1 s heartbeat it would count as dead (3 missed beats)
        # before the queue is full on a slow machine, and the refusal would
        # be model_unavailable instead of the backpressure under test.
        "INFERQ_HEARTBEAT_INTERVAL": "10",
    }
    api = inferq(["api"], env, stack.log)
    worker = inferq(["worker", "--model", MODEL], env, stack.log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_status(url + "/health", 200, 60, stack.log)
        yield Paused(url, other_redis_url, os.getpgid(worker.pid))
    finally:
        # Never leave the worker stopped: it could not exit.
        os.killpg(os.getpgid(worker.pid), signal.SIGCONT)
        stop(worker)
        stop(api)


def _waiting(client: redis.Redis) -> int:
    return int(client.llen(keys.model_queue(MODEL)))


def test_full_queue_is_a_503_with_retry_after(own_stack: Paused) -> None:
    client = redis.Redis.from_url(own_stack.redis_url)
    assert httpx.post(own_stack.url + "/v1/chat/completions", json=BODY, timeout=30).is_success
    accepted: list[httpx.Response] = []

    def send() -> None:
        response = httpx.post(own_stack.url + "/v1/chat/completions", json=BODY, timeout=90)
        accepted.append(response)

    threads: list[threading.Thread] = []
    os.killpg(own_stack.worker_pgid, signal.SIGSTOP)
    try:
        # Requests pile up behind the stalled worker (it may still take one,
        # through a BRPOP it had sent: that one waits too) until the next is
        # refused; exactly DEPTH are then waiting.
        deadline = time.monotonic() + 30
        while not any(r.status_code == 503 for r in accepted):
            assert time.monotonic() < deadline, "no request was ever refused"
            thread = threading.Thread(target=send)
            thread.start()
            threads.append(thread)
            thread.join(1.0)
        refusals = [r for r in accepted if r.status_code == 503]
        assert len(refusals) == 1 and len(accepted) == 1, [r.text for r in accepted]
        assert len(threads) == DEPTH + 1
        accepted.clear()
        threads = [t for t in threads if t.is_alive()]
        waiting = _waiting(client)
        started = time.monotonic()
        refused = httpx.post(own_stack.url + "/v1/chat/completions", json=BODY, timeout=30)
        elapsed = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "server_overloaded" and error["type"] == "unavailable_error"
        assert elapsed < 2
        # Nothing was enqueued for it; embeddings and streams are refused alike.
        assert _waiting(client) == waiting
        streamed = httpx.post(
            own_stack.url + "/v1/chat/completions", json={**BODY, "stream": True}, timeout=30
        )
        assert streamed.status_code == 503 and "retry-after" in streamed.headers
    finally:
        os.killpg(own_stack.worker_pgid, signal.SIGCONT)
    for thread in threads:
        thread.join(60)
    # Every request the API accepted is answered once the worker runs again.
    assert len(accepted) == len(threads)
    assert all(r.status_code == 200 for r in accepted), [r.text for r in accepted]
    after = httpx.post(own_stack.url + "/v1/chat/completions", json=BODY, timeout=30)
    assert after.status_code == 200, after.text
