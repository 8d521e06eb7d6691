"""Two `inferq api` processes on one Redis and one Postgres, each running the
batch scheduler: one leads at a time. The leader is frozen (SIGSTOP) past
its lock's TTL while a batch runs, the other takes over, and the frozen one
is woken again beside it, twice; the batch completes with every line once in
its output and one usage row per line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.batches import numbered_lines, output_in_order, submit, wait
from tests.support.fleet import Fleet, durable
from tests.support.procs import free_port, inferq, stop, wait_status

__all__ = ["durable"]

pytestmark = pytest.mark.timeout(240)

LINES = 200
# The scheduler's lock lives max(5, 5 x tick) seconds (api/batches/scheduler.py).
LOCK_TTL_S = 5.0
_EPOCH = re.compile(rb"batch scheduler: leading \(epoch (\d+)\)")


def _epoch(log: Path) -> int:
    """The newest epoch this process took, or 0."""
    found = [int(m) for m in _EPOCH.findall(log.read_bytes())] if log.exists() else []
    return max(found, default=0)


def test_two_api_processes_never_move_a_batch_twice(durable: Fleet, tmp_path: Path) -> None:
    second_log = tmp_path / "api2.log"
    second_url = f"http://127.0.0.1:{free_port()}"
    env = {**durable.env, "INFERQ_PORT": second_url.rsplit(":", 1)[1]}
    second = inferq(["api"], env, second_log)
    first = durable.running_api()
    try:
        wait_status(second_url + "/v1/models", 200, 30, second_log)
        apis: dict[str, tuple[subprocess.Popen[bytes], Path]] = {
            "first": (first, durable.log),
            "second": (second, second_log),
        }
        client = durable.client(max_retries=5)
        batch = submit(client, numbered_lines(LINES, max_tokens=96))
        takeovers = 0
        for _ in range(2):
            # The leader is the process that took the newest epoch.
            deadline = time.monotonic() + 20
            while max(_epoch(log) for _, log in apis.values()) == 0:
                assert time.monotonic() < deadline, "no API process ever led"
                time.sleep(0.1)
            leader = max(apis, key=lambda name: _epoch(apis[name][1]))
            other = next(name for name in apis if name != leader)
            proc, _ = apis[leader]
            before = _epoch(apis[other][1])
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                # The other takes over once the frozen leader's lock lapses.
                deadline = time.monotonic() + LOCK_TTL_S + 15
                while _epoch(apis[other][1]) <= max(before, _epoch(apis[leader][1])):
                    assert time.monotonic() < deadline, f"{other} never took over from {leader}"
                    time.sleep(0.1)
                takeovers += 1
                # Let the new leader move the batch for a while beside the
                # frozen one, then wake the stale leader mid-batch.
                time.sleep(1.0)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            state = client.batches.retrieve(batch.id)
            assert state.request_counts is not None
            assert state.status == "in_progress", "the batch ended before the test could strike"
            assert state.request_counts.completed < LINES
        done = wait(client, batch.id, 180)
    finally:
        stop(second, signal.SIGKILL)
    assert takeovers == 2
    assert done.status == "completed", done
    output = output_in_order(client, done, LINES)
    assert all(line["response"]["status_code"] == 200 for line in output)
    engine = create_engine(durable.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT request_id) FROM usage "
                    "WHERE request_id LIKE :lines"
                ),
                {"lines": f"{batch.id}:%"},
            ).one()
            outputs = conn.execute(
                text("SELECT count(*) FROM files WHERE purpose = 'batch_output'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert tuple(rows) == (LINES, LINES)
    # One output file: the stale leader's finalization (if it tried) was refused.
    assert outputs == 1
