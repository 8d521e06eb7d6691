"""A batch survives its processes: the worker killed with SIGKILL mid-batch,
the API killed and restarted, Redis restarted (losing every queued message).
Each time the batch completes with every line exactly once in its output.

These run their own stack (a private Redis they may restart, their own
database) with short leases, so a lost line comes back within seconds."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.support.batches import (
    by_custom_id,
    numbered_lines,
    output_in_order,
    submit,
    wait,
    wait_for,
)
from tests.support.fleet import Fleet, durable

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


def test_redis_restarted_mid_batch(durable: Fleet) -> None:
    def restart_redis(stack: Fleet) -> None:
        # The worker is frozen first, so chunks pile up in Redis; then a new,
        # empty server takes the port: everything queued is gone.
        worker = stack.workers["worker"]
        worker.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.0)
            stack.stop_redis()
            # Not waiting for it: the worker wakes while the port may still
            # be closed, and loses its broker connection.
            stack.start_redis(wait=False)
        finally:
            worker.send_signal(signal.SIGCONT)

    _run_through(durable, restart_redis)
    # The chunks queued in the old Redis were lost and their lines put back.
    assert "back to pending" in durable.log.read_text()
