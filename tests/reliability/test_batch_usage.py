"""Usage is written exactly once per line result: a worker whose lease lapsed
(its line went back to pending and to another worker) writes neither the
result nor a usage row, before or after the new holder; a write retried after
its commit still leaves one row. Interactive usage rows are buffered and
idempotent on request_id."""

from __future__ import annotations

import time
from collections import Counter

from api.batches import feeding
from schemas import batches as b
from schemas.db import make_engine
from schemas.events import error_body
from schemas.tables import BATCH_LINES, utcnow
from tests.reliability.batch_bench import Bench, chat_lines
from workers.bulk import BulkRunner, Held, Outcome
from workers.usage import UsageWriter, record_usage, writer_for


def _result(text: str) -> dict[str, object]:
    return b.http_result(400, error_body(text, type="invalid_request_error", code="x"))


def _outcome(batch_id: str, chunk: str, text: str) -> Outcome:
    held = Held(batch_id, 0, chunk, endpoint="chat.completions")
    return Outcome(held, b.FAILED, _result(text), prompt_tokens=3)


def test_a_stale_lease_holder_writes_nothing(bench: Bench) -> None:
    batch_id = bench.submit(chat_lines(1))
    scheduler = bench.scheduler()
    bench.run_until(scheduler, batch_id, {b.IN_PROGRESS}, 30)
    old = BulkRunner(
        db=bench.db, worker_id="w-old", model="tiny", lease=3, runtime=None, embed_runtime=None
    )
    new = BulkRunner(
        db=bench.db, worker_id="w-new", model="tiny", lease=3, runtime=None, embed_runtime=None
    )
    try:
        line = (BATCH_LINES.c.batch_id == batch_id) & (BATCH_LINES.c.line == 0)
        # The old worker held it under chunk c-old, and its lease lapsed.
        bench.hold(line, chunk="c-old", worker="w-old", attempts=1, lease_s=-1)
        assert scheduler.lead.epoch is not None
        feeding.reclaim(bench.db, bench.settings, scheduler.lead.check)
        bench.hold(
            line,
            BATCH_LINES.c.state == b.PENDING,
            chunk="c-new",
            worker="w-new",
            attempts=2,
            lease_s=30,
        )
        old._write([_outcome(batch_id, "c-old", "stale, before")])
        assert bench.usage_ids() == []
        new._write([_outcome(batch_id, "c-new", "current")])
        # Retried after a commit whose answer was lost; and the stale one again.
        new._write([_outcome(batch_id, "c-new", "current, again")])
        old._write([_outcome(batch_id, "c-old", "stale, after")])
    finally:
        old.close()
        new.close()
    (row,) = bench.lines(batch_id)
    assert row.state == b.FAILED and row.worker == "w-new"
    assert row.result["body"]["error"]["message"] == "current"
    assert Counter(bench.usage_ids()) == Counter({f"{batch_id}:0": 1})
    record = bench.run_until(scheduler, batch_id, {b.COMPLETED}, 30)
    assert [line["custom_id"] for line in bench.output(record.error_file_id)] == ["line-0"]


def test_interactive_usage_is_buffered_and_written_once(bench: Bench) -> None:
    def record(request_id: str) -> None:
        record_usage(
            bench.db,
            request_id=request_id,
            model="tiny",
            endpoint="chat.completions",
            prompt_tokens=1,
            completion_tokens=2,
            ttft_ms=1.0,
            duration_ms=2.0,
            status="completed",
        )

    started = time.perf_counter()
    for i in range(300):
        record(f"req-{i}")
    record("req-7")  # a job that ran twice (redelivered)
    # Recording never waits on the database.
    assert time.perf_counter() - started < 1.0
    assert writer_for(bench.db).flush(10)
    assert Counter(bench.usage_ids()) == Counter({f"req-{i}": 1 for i in range(300)})


def test_the_usage_buffer_is_bounded(bench: Bench) -> None:
    # A writer whose database is unreachable: the oldest rows go past the bound.
    dead = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    writer = UsageWriter(dead, limit=5)
    for i in range(8):
        writer.add({"request_id": f"r{i}"})
    try:
        assert writer.pending() == 5 and writer.dropped == 3
    finally:
        writer.close()
        dead.dispose()


def test_an_unstorable_result_fails_its_line_alone(bench: Bench) -> None:
    """A result the database refuses must not hold the writer's backlog (and
    every later result) up forever: that line fails, its neighbour lands."""
    batch_id = bench.submit(chat_lines(2))
    scheduler = bench.scheduler()
    bench.run_until(scheduler, batch_id, {b.IN_PROGRESS}, 30)
    bench.hold(BATCH_LINES.c.batch_id == batch_id, chunk="c", worker="w", attempts=1, lease_s=30)
    runner = BulkRunner(
        db=bench.db, worker_id="w", model="tiny", lease=3, runtime=None, embed_runtime=None
    )
    try:
        bad = Outcome(
            Held(batch_id, 0, "c", endpoint="chat.completions"), b.FAILED, {"x": float("inf")}
        )
        good = Outcome(Held(batch_id, 1, "c", endpoint="chat.completions"), b.FAILED, _result("ok"))
        runner._write_all([bad, good])
    finally:
        runner.close()
    first, second = bench.lines(batch_id)
    assert first.state == b.FAILED
    assert "could not be stored" in first.result["event"]["message"]
    assert second.state == b.FAILED and second.result["body"]["error"]["message"] == "ok"
    assert Counter(bench.usage_ids()) == Counter({f"{batch_id}:0": 1, f"{batch_id}:1": 1})


def test_a_refused_usage_row_does_not_hold_back_the_others(bench: Bench) -> None:
    writer = UsageWriter(bench.db, limit=100)
    try:
        row = {"model": "tiny", "endpoint": "e", "prompt_tokens": 1, "completion_tokens": 1}
        row |= {"ttft_ms": None, "duration_ms": 1.0, "status": "completed", "worker": None}
        writer.add({**row, "created_at": utcnow(), "request_id": "before"})
        writer.add({**row, "created_at": utcnow(), "request_id": "x" * 500})  # too long
        writer.add({**row, "created_at": utcnow(), "request_id": "after"})
        assert writer.flush(10)
    finally:
        writer.close()
    assert sorted(bench.usage_ids()) == ["after", "before"]
