"""A batch survives its processes: the worker killed with SIGKILL mid-batch,
the API killed and restarted, Redis restarted (losing every queued message).
Each time the batch completes with every line exactly once in its output.

These run their own stack (a private Redis they may restart, their own
database) with short leases, so a lost line comes back within seconds."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas import keys
from tests.support.batches import (
    by_custom_id,
    numbered_lines,
    output_in_order,
    submit,
    wait,
    wait_for,
)
from tests.support.deploy import scratch_database
from tests.support.fleet import MODEL, Fleet, batch_fleet, durable

__all__ = ["durable"]

LINES = 300


def _run_through(stack: Fleet, disrupt: Callable[[Fleet], None]) -> None:
    client = stack.client(max_retries=5)
    batch = submit(client, numbered_lines(LINES, max_tokens=96))
    running = wait_for(client, batch.id, 60, done=LINES // 12)
    # The disruption must hit a batch with work left, or it proves nothing.
    assert running.status == "in_progress" and running.request_counts is not None
    assert running.request_counts.completed < LINES // 2
    disrupt(stack)
    batch = wait(client, batch.id, 180)
    assert batch.status == "completed", (batch, stack.log.read_text()[-4000:])
    # Exactly once each, in input order, every one a full answer.
    output = output_in_order(client, batch, LINES)
    for line in by_custom_id(output).values():
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["usage"]["completion_tokens"] == 96
    assert batch.error_file_id is None


def test_worker_killed_mid_batch(durable: Fleet) -> None:
    def kill_worker(stack: Fleet) -> None:
        # While it holds lines (the tiny model finishes a chunk in a blink).
        stack.wait_lines_running()
        stack.kill_worker("worker")
        stack.start_worker("worker", wait=False)

    _run_through(durable, kill_worker)
    # Lines the dead worker held ran again, on the new one.
    assert durable.max_attempts() >= 2


def test_api_restarted_mid_batch(durable: Fleet) -> None:
    def restart_api(stack: Fleet) -> None:
        stack.kill_api()
        time.sleep(1.0)
        stack.start_api()

    _run_through(durable, restart_api)


@pytest.fixture
def slow_beats(tmp_path: Path, tiny_gguf: Path, pg_server_url: str) -> Iterator[Fleet]:
    """A batch fleet whose workers count as alive for 15 s without a beat
    (5 s heartbeats), while their 3 s leases lapse as usual."""
    with (
        scratch_database(pg_server_url, "inferq_durable") as database_url,
        batch_fleet(
            tmp_path, tiny_gguf, database_url=database_url, INFERQ_HEARTBEAT_INTERVAL="5"
        ) as stack,
    ):
        yield stack


def test_redis_restarted_mid_batch(slow_beats: Fleet) -> None:
    wiped_at = 0

    def restart_redis(stack: Fleet) -> None:
        nonlocal wiped_at
        # The worker takes chunks as they come, so none wait in Redis while it
        # runs. Frozen, its leases lapse and the scheduler queues those lines
        # again, to a worker that still counts as alive: chunks pile up in
        # Redis. Then a new, empty server takes the port: all of them are gone.
        worker = stack.workers["worker"]
        worker.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while stack.redis().llen(keys.bulk_queue(MODEL)) == 0:
                assert time.monotonic() < deadline, "no chunk ever waited in Redis"
                time.sleep(0.1)
            wiped_at = len(stack.log.read_text())
            stack.stop_redis()
            # Not waiting for it: the worker wakes while the port may still
            # be closed, and loses its broker connection.
            stack.start_redis(wait=False)
        finally:
            worker.send_signal(signal.SIGCONT)

    _run_through(slow_beats, restart_redis)
    # The chunks queued in the old Redis were lost and their lines put back.
    assert "back to pending" in slow_beats.log.read_text()[wiped_at:]
