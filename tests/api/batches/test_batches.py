"""The OpenAI Batches API end to end, through the official client, against
`inferq api` + `inferq worker` on real Redis, Postgres and llama.cpp."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.batches import (
    by_custom_id,
    chat_line,
    jsonl,
    read_lines,
    submit,
    wait,
    wait_for,
)
from tests.support.stack import Stack


def test_chat_batch_completes_and_bad_lines_fail_alone(stack: Stack) -> None:
    client = stack.client()
    lines = [chat_line(f"q{i}", f"question {i}", max_tokens=8) for i in range(12)]
    lines.append(chat_line("hot", "bad top_p", top_p=5))
    lines.append(chat_line("nomodel", "who", model="no-such-model"))
    lines.append(chat_line("toolong", "long " * 3000, max_tokens=8))
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.endpoint == "/v1/chat/completions"
    assert batch.metadata == {"suite": "e2e"}
    seen: set[str] = set()
    batch = wait(client, batch.id, 120, seen)
    assert batch.status == "completed", batch
    assert "in_progress" in seen or "finalizing" in seen
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (15, 12, 3)
    assert batch.in_progress_at and batch.completed_at and batch.finalizing_at
    assert batch.created_at <= batch.in_progress_at <= batch.completed_at

    output = by_custom_id(read_lines(client, batch.output_file_id))
    assert set(output) == {f"q{i}" for i in range(12)}
    for custom_id, line in output.items():
        response = line["response"]
        assert line["error"] is None and response["status_code"] == 200
        assert line["id"] == response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 0 < body["usage"]["completion_tokens"] <= 8, custom_id
    # Input order is kept.
    assert [line["custom_id"] for line in read_lines(client, batch.output_file_id)] == [
        f"q{i}" for i in range(12)
    ]

    errors = by_custom_id(read_lines(client, batch.error_file_id))
    assert set(errors) == {"hot", "nomodel", "toolong"}
    assert errors["hot"]["response"]["status_code"] == 400
    assert errors["hot"]["response"]["body"]["error"]["param"] == "top_p"
    assert errors["nomodel"]["response"]["status_code"] == 404
    assert errors["nomodel"]["response"]["body"]["error"]["code"] == "model_not_found"
    # Rejected by the worker (the context does not fit), not by validation.
    too_long = errors["toolong"]["response"]
    assert too_long["status_code"] == 400
    assert too_long["body"]["error"]["code"] == "context_length_exceeded"

    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def test_completions_batch(stack: Stack) -> None:
    client = stack.client()
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": f"count {i}", "max_tokens": 5, "seed": i},
        }
        for i in range(5)
    ]
    batch = wait(client, submit(client, lines, endpoint="/v1/completions").id, 60)
    assert batch.status == "completed"
    output = by_custom_id(read_lines(client, batch.output_file_id))
    assert set(output) == {f"c{i}" for i in range(5)}
    assert all(o["response"]["body"]["object"] == "text_completion" for o in output.values())
    assert batch.error_file_id is None


def test_invalid_file_fails_with_line_errors(stack: Stack) -> None:
    client = stack.client()
    good = chat_line("a", "hi", max_tokens=2)
    other = {**good, "custom_id": "b", "url": "/v1/embeddings"}
    data = jsonl([good]) + b"this is not json\n" + jsonl([good, other])
    batch = wait(client, submit(client, data).id, 30)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data is not None
    found = {(e.line, e.code) for e in batch.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
    }
    assert batch.output_file_id is None


def test_create_rejects_bad_requests(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(
            input_file_id="file-nope",
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert exc.value.code == "file_not_found"
    file = client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    for window in ("tomorrow", "0h", "-1h"):
        with pytest.raises(openai.BadRequestError):
            client.batches.create(
                input_file_id=file.id,
                endpoint="/v1/chat/completions",
                completion_window=window,  # type: ignore[arg-type]
            )
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/images",  # type: ignore[arg-type]
            completion_window="24h",
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    # Ids Postgres could not even compare (a NUL byte) are just not found.
    assert httpx.get(stack.url + "/v1/batches/a%00b").status_code == 404
    assert httpx.get(stack.url + "/v1/files/a%00b").status_code == 404
    assert httpx.get(stack.url + "/v1/batches", params={"after": "a\x00b"}).status_code == 200


def test_cancel_keeps_finished_lines(stack: Stack) -> None:
    client = stack.client()
    lines = [chat_line(f"l{i}", f"story {i}", max_tokens=200, ignore_eos=True) for i in range(60)]
    batch = submit(client, lines)
    wait_for(client, batch.id, 60, done=2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait(client, batch.id, 60)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts is not None and counts.total == 60
    assert counts.completed >= 2 and counts.completed + counts.failed == 60
    assert counts.completed < 60
    output = by_custom_id(read_lines(client, batch.output_file_id))
    errors = by_custom_id(read_lines(client, batch.error_file_id))
    assert len(output) == counts.completed and set(output) | set(errors) == {
        f"l{i}" for i in range(60)
    }
    assert all(o["response"]["status_code"] == 200 for o in output.values())
    # Lines that never ran carry no response, only why.
    assert all(e["response"] is None for e in errors.values())
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    # Cancelling again answers the batch as it is; a finished one cannot be.
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_batch_expires_when_no_worker_serves_it(stack: Stack) -> None:
    client = stack.client()
    lines = [chat_line(f"e{i}", "hello", model="other", max_tokens=2) for i in range(3)]
    batch = wait(client, submit(client, lines, window="2s").id, 30)
    assert batch.status == "expired" and batch.expired_at
    errors = by_custom_id(read_lines(client, batch.error_file_id))
    assert set(errors) == {"e0", "e1", "e2"}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert all(e["response"] is None for e in errors.values())
    with pytest.raises(openai.APIStatusError) as exc:
        client.batches.cancel(batch.id)
    assert exc.value.status_code == 409
