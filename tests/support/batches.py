"""Shared by the bulk-job tests: write input files, wait for batches, read
output files line by line."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai
from openai.types import Batch

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def submit(
    client: openai.OpenAI,
    lines: list[dict[str, Any]] | bytes,
    *,
    endpoint: str = "/v1/chat/completions",
    window: str = "24h",
) -> Batch:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    file = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(
        input_file_id=file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window=window,  # type: ignore[arg-type]
        metadata={"suite": "e2e"},
    )


def wait(
    client: openai.OpenAI, batch_id: str, timeout: float, seen: set[str] | None = None
) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if seen is not None:
            seen.add(batch.status)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.1)


def wait_for(client: openai.OpenAI, batch_id: str, timeout: float, done: int) -> Batch:
    """Until at least `done` lines finished (or the batch ended)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        finished = counts.completed + counts.failed if counts else 0
        if finished >= done or batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"only {finished} lines done: {batch}"
        time.sleep(0.05)


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_custom_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        assert line["custom_id"] not in out, f"{line['custom_id']} appears twice"
        out[line["custom_id"]] = line
    return out


def numbered_lines(count: int, *, max_tokens: int) -> list[dict[str, Any]]:
    """`count` chat lines `line-0`, `line-1`, ..., each generating exactly
    `max_tokens` tokens (a seed of its own, EOS ignored)."""
    return [
        chat_line(f"line-{i}", f"tell me about {i}", max_tokens=max_tokens, ignore_eos=True, seed=i)
        for i in range(count)
    ]


def output_in_order(client: openai.OpenAI, batch: Batch, count: int) -> list[dict[str, Any]]:
    """The output of a batch of `numbered_lines(count)` that completed them
    all: every line exactly once, in input order."""
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (
        count,
        count,
        0,
    )
    output = read_lines(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == [f"line-{i}" for i in range(count)]
    return output
