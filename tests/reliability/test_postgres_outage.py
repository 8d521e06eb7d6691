"""Postgres goes away mid-batch and comes back.

While it is down, interactive requests keep being answered (their usage rows
wait in the worker's memory) and batch work pauses: the scheduler's passes
fail and retry, the worker keeps its finished results and retries them, and
leases that lapsed meanwhile are not reclaimed before the workers had a lease
to renew them. When it returns, everything resumes without a restart: the
batch completes with every line exactly once, and every usage row (batch
lines and the interactive requests) is in the database exactly once.

The test owns its Postgres cluster (stopped with a fast shutdown and started
again on the same data directory and port), its Redis and its processes."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.batches import numbered_lines, output_in_order, submit, wait, wait_for
from tests.support.deploy import poll_usage
from tests.support.fleet import Fleet, batch_fleet
from tests.support.postgres_server import start_postgres
from tests.support.servers import Restartable

LINES = 60
OUTAGE_S = 6.0  # longer than the lease (3 s): leases lapse while it is down


@pytest.fixture
def outage(tmp_path: Path, tiny_gguf: Path) -> Iterator[tuple[Fleet, Restartable]]:
    cluster = Restartable(start_postgres())
    try:
        with batch_fleet(
            tmp_path, tiny_gguf, database_url=cluster.server.url, INFERQ_REQUEST_TIMEOUT="30"
        ) as stack:
            yield stack, cluster
    finally:
        cluster.close()


def _chat(url: str, content: str) -> tuple[int, str, float]:
    started = time.monotonic()
    response = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
        },
        timeout=30,
    )
    body = response.json()
    return response.status_code, str(body.get("id", body)), time.monotonic() - started


def test_postgres_outage_mid_batch(outage: tuple[Fleet, Restartable]) -> None:
    stack, cluster = outage
    client = stack.client()
    batch = submit(client, numbered_lines(LINES, max_tokens=160))
    running = wait_for(client, batch.id, 60, done=LINES // 10)
    assert running.status == "in_progress"
    assert running.request_counts is not None and running.request_counts.completed < LINES // 2
    stack.wait_lines_running()
    cluster.halt(signal.SIGINT, timeout=20)  # fast shutdown: sessions are cut
    down_at = time.monotonic()
    interactive: list[str] = []
    # Interactive requests keep being served while the database is away.
    while time.monotonic() - down_at < OUTAGE_S:
        status, request_id, took = _chat(stack.url, f"still there? {len(interactive)}")
        assert status == 200, (status, request_id, stack.log.read_text()[-3000:])
        assert took < 10, took
        interactive.append(request_id)
        time.sleep(0.5)
    assert len(interactive) >= 3
    # The Files and Batches API needs the database: a 503 to retry, not a 500.
    started = time.monotonic()
    polled = httpx.get(f"{stack.url}/v1/batches/{batch.id}", timeout=30)
    assert polled.status_code == 503, polled.text
    assert polled.json()["error"]["code"] == "database_unavailable"
    assert int(polled.headers["retry-after"]) >= 1
    assert time.monotonic() - started < 10
    cluster.start()

    # Batch work resumes by itself; every line exactly once, in order.
    done = wait(client, batch.id, 180)
    assert done.status == "completed", (done, stack.log.read_text()[-4000:])
    output = output_in_order(client, done, LINES)
    for line in output:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["usage"]["completion_tokens"] == 160
    # After the outage the worker still serves at once.
    status, request_id, took = _chat(stack.url, "and now?")
    assert status == 200 and took < 10
    interactive.append(request_id)

    # Usage: one row per batch line and per interactive request, none lost,
    # none doubled (the buffered rows reach the database within seconds).
    expected = Counter({f"{batch.id}:{i}": 1 for i in range(LINES)} | dict.fromkeys(interactive, 1))

    def request_ids(rows: list[dict[str, Any]]) -> Counter[str]:
        return Counter(row["request_id"] for row in rows)

    rows = poll_usage(
        database_url=stack.database_url,
        until=lambda rows: request_ids(rows) == expected,
        timeout=20,
        interval=0.2,
    )
    ids = request_ids(rows)
    assert ids == expected, (ids - expected, expected - ids)
    log = stack.log.read_text()
    assert "batch scheduler tick failed" in log  # the outage was real
    # The worker finished lines while the database was away and wrote them
    # afterwards; no lease was reclaimed, so no line ran twice.
    assert "bulk results written again" in log
    assert "back to pending" not in log
    assert stack.max_attempts() == 1
