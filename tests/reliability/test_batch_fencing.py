"""Two batch schedulers on one Redis and one Postgres: the leader stalls in
the middle of a validation for longer than its lock's TTL, the other takes
over and runs the batch to the end on a real worker; when the stalled one
wakes up, its writes are refused (it would otherwise have put every line back
to pending). Every line runs once and lands once."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest

from api.batches.scheduler import BatchScheduler
from schemas import batches as b
from schemas.batch_lines import Line
from tests.reliability.batch_bench import Bench, chat_lines

LINES = 12


class Stalling(BatchScheduler):
    """A leader that freezes once it has validated a batch, before storing
    its lines (as a paused process or a very long validation would)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stalled = threading.Event()
        self.release = threading.Event()

    def _store_lines(self, batch_id: str, lines: list[Line]) -> None:
        if not self.stalled.is_set():
            self.stalled.set()
            assert self.release.wait(60)
        super()._store_lines(batch_id, lines)


def test_a_stale_leader_cannot_act_beside_the_new_one(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inferq.batches")
    bench.start_worker()
    batch_id = bench.submit(chat_lines(LINES, max_tokens=6))
    stale = bench.scheduler(Stalling)
    assert isinstance(stale, Stalling)
    fresh = bench.scheduler()
    frozen = threading.Thread(target=stale.pass_once)
    frozen.start()
    try:
        assert stale.stalled.wait(30), "the first scheduler never reached the lines"
        assert stale.lead.epoch is not None
        # While the leader is frozen, the other cannot lead...
        fresh.pass_once()
        assert fresh.lead.epoch is None
        # ...until the lock lapses.
        time.sleep(stale.lead.ttl_ms / 1000 + 0.5)
        record = bench.run_until(fresh, batch_id, {b.COMPLETED}, 90)
        assert fresh.lead.epoch is not None and fresh.lead.epoch > stale.lead.epoch
    finally:
        stale.release.set()
        frozen.join(30)
    # The stale leader learnt it was fenced, and changed nothing.
    assert stale.lead.epoch is None
    assert any("newer batch scheduler leader" in r.getMessage() for r in caplog.records)
    lines = bench.lines(batch_id)
    assert [line.state for line in lines] == [b.DONE] * LINES
    assert [line.attempts for line in lines] == [1] * LINES
    assert bench.batch(batch_id).status == b.COMPLETED
    output = bench.output(record.output_file_id)
    assert [line["custom_id"] for line in output] == [f"line-{i}" for i in range(LINES)]
    assert all(line["response"]["status_code"] == 200 for line in output)
    # One usage row per line (the worker's writer flushes with the result).
    usage = Counter(bench.usage_ids())
    assert usage == Counter({f"{batch_id}:{i}": 1 for i in range(LINES)})
    # It cannot take over again while the new leader keeps its lock.
    fresh.pass_once()
    stale.pass_once()
    assert stale.lead.epoch is None and fresh.lead.epoch is not None
