"""One bad batch never stops the others: hostile batch files, a batch the
scheduler cannot validate, one it cannot finalize, all beside good batches
that a real worker runs to completion on real Redis and Postgres."""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DataError

from api.batches import store
from schemas import batches as b
from schemas.batch_lines import Line
from schemas.tables import BATCH_LINES, BATCHES
from tests.reliability.batch_bench import CHAT, Bench, chat_lines


def _item(custom_id: str, body: dict[str, object]) -> bytes:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}
    ).encode()


def _chat(content: str, **extra: object) -> dict[str, object]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **extra,
    }


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": [value]}
    return value


# Batch lines whose requests are hostile: each gets a sensible answer of its
# own (a 4xx, or a 200 where the request is fine after all).
HOSTILE_LINES = [
    _item("superscript", _chat("hi", logit_bias={"²": 1})),
    _item("surrogate", _chat("\ud800")),
    _item("nul", _chat("a\x00b")),
    _item("huge_int", _chat("hi", max_tokens=10**30)),
    _item("huge_seed", _chat("hi", seed=-(10**40))),
    _item("deep", _chat("hi", response_format=_nested(300))),
    _item("ghost", {**_chat("hi"), "model": "ghost\x00"}),
    b'{"custom_id": "infinite", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}}',
    b'{"custom_id": "nan", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}}',
]

# Lines that are no batch lines at all: the file fails, naming each.
NOT_BATCH_LINES = [
    b"[" * 50_000 + b"]" * 50_000,
    b'{"custom_id": "\xff", "method": "POST"}',
    b'"a string"',
    b"[1, 2]",
    _item("\udc00", _chat("hi")),
    b'{"custom_id": "x", "n": ' + b"7" * 5000 + b"}",
]


def test_bad_batches_fail_alone(bench: Bench, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inferq.batches")
    good = bench.submit(chat_lines(6, max_tokens=6))
    hostile = bench.submit(
        b"\n".join([_item("ok-1", _chat("hi")), *HOSTILE_LINES, _item("ok-2", _chat("hi"))])
    )
    not_batch = bench.submit(b"\n".join([_item("fine", _chat("hi")), *NOT_BATCH_LINES]))
    # A batch the scheduler cannot validate (a row damaged in the database)
    # and one it cannot finalize (a line result damaged after validation).
    unreadable = bench.submit(chat_lines(2))
    with bench.db.begin() as conn:
        conn.execute(update(BATCHES).where(BATCHES.c.id == unreadable).values(endpoint="/v1/gone"))
    unfinishable = bench.submit(chat_lines(2, stream=True))  # lines fail at validation
    bench.start_worker()
    scheduler = bench.scheduler()
    scheduler.pass_once()
    assert bench.batch(unfinishable).status == "in_progress"
    with bench.db.begin() as conn:
        conn.execute(
            update(BATCH_LINES)
            .where(BATCH_LINES.c.batch_id == unfinishable, BATCH_LINES.c.line == 1)
            .values(result={"damaged": True})
        )

    done = bench.run_until(scheduler, good, {"completed"}, 60)
    output = bench.output(done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"line-{i}" for i in range(6)]
    assert all(line["response"]["status_code"] == 200 for line in output)

    record = bench.run_until(scheduler, hostile, {"completed"}, 60)
    results = {
        line["custom_id"]: line["response"]["status_code"]
        for line in bench.output(record.output_file_id) + bench.output(record.error_file_id)
    }
    assert results["ok-1"] == results["ok-2"] == 200
    assert len(results) == len(HOSTILE_LINES) + 2
    for custom_id, status in results.items():
        assert status == 200 or 400 <= status < 500, (custom_id, status)
    for custom_id in ("superscript", "surrogate", "infinite", "nan", "deep"):
        assert results[custom_id] == 400, (custom_id, results[custom_id])

    failed = bench.batch(not_batch)
    assert failed.status == "failed"
    assert failed.errors is not None
    named = [e["line"] for e in failed.errors["data"]]  # type: ignore[call-overload]
    assert named == [2, 3, 4, 5, 6, 7], failed.errors

    for batch_id, step in ((unreadable, "validating"), (unfinishable, "finalizing")):
        record = bench.run_until(scheduler, batch_id, {"failed", "completed"}, 30)
        assert record.status == "failed", (batch_id, record.status)
        assert record.errors is not None
        error = record.errors["data"][0]  # type: ignore[call-overload]
        assert error["code"] == "internal_error" and step in error["message"], error
        assert any(batch_id in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)

    # And the scheduler still moves new work.
    after = bench.submit(chat_lines(3, prefix="after", max_tokens=4))
    record = bench.run_until(scheduler, after, {"completed"}, 60)
    assert [line["custom_id"] for line in bench.output(record.output_file_id)] == [
        f"after-{i}" for i in range(3)
    ]


def test_lines_the_database_refuses_fail_alone(bench: Bench) -> None:
    """Values validation did not foresee and Postgres refuses (Infinity in
    json, NUL or a lone surrogate in text) fail their own line only."""
    batch_id = bench.submit(chat_lines(1))
    scheduler = bench.scheduler()
    assert scheduler.lead.lead()
    job = {"task": "generate", "payload": {"x": 1}, "options": {}}
    lines = [
        Line(0, "fine", "batch_req_0", "tiny", job),
        Line(1, "infinite", "batch_req_1", "tiny", {**job, "options": {"t": float("inf")}}),
        Line(2, "nul\x00id", "batch_req_2", "tiny", job),
        Line(3, "surrogate", "batch_req_3", "tiny\udc00", job),
        Line(4, "fine-too", "batch_req_4", "tiny", job),
    ]
    # The fast path (one insert for all) is refused as a whole.
    with pytest.raises((DataError, ValueError)):
        store.insert_lines(bench.db, batch_id=batch_id, lines=lines)
    scheduler._store_lines(batch_id, lines)
    rows = bench.lines(batch_id)
    assert [(r.line, r.state) for r in rows] == [
        (0, b.PENDING),
        (1, b.FAILED),
        (2, b.FAILED),
        (3, b.FAILED),
        (4, b.PENDING),
    ]
    for row in rows[1:4]:
        assert row.result["status_code"] == 400
        assert "cannot store" in row.result["body"]["error"]["message"]
    assert bench.batch(batch_id).status == b.IN_PROGRESS
