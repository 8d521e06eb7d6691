"""Per-key rate limits and quotas: the estimate rule, OpenAI's headers and
429s, counted in one Redis across two API processes, quota windows per
model, and the batch-token allowance checked at create (atomically, on
Postgres and on SQLite)."""

from __future__ import annotations

import io
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, update

from api.accounts import batch_quota
from api.accounts.limits import duration, estimate_tokens
from api.accounts.principal import Principal
from api.accounts.store import Limits, create_key, token_id
from api.batches import protocol
from api.errors import APIError
from api.files import store as files_store
from inferq.migrate import upgrade
from schemas import keys
from schemas.accounts import QuotaRule
from schemas.db import make_engine
from schemas.jobs import EmbedJob, GenerateJob, Message
from schemas.sampling import SamplingOptions
from schemas.tables import BatchRecord
from tests.support.accounts import accounts, as_key, new_key, openai_as
from tests.support.batches import chat_line, jsonl
from tests.support.deploy import MODEL, poll_usage
from tests.support.fleet import Fleet
from tests.support.procs import free_port, inferq, stop, wait_status

__all__ = ["accounts"]

# OpenAI's duration format: "20ms", "1s", "1.5s", "6m0s", "2h0m0s".
DURATION = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")
HEADERS = ("limit", "remaining", "reset")


# -- the rules, without a server ---------------------------------------------------


def test_duration_is_openais_format() -> None:
    assert duration(0) == "0s"
    assert duration(0.02) == "20ms"
    assert duration(1) == "1s"
    assert duration(1.5) == "1.5s"
    assert duration(20) == "20s"
    assert duration(360) == "6m0s"
    assert duration(90.25) == "1m30.25s"
    assert duration(7200) == "2h0m0s"
    assert all(DURATION.match(duration(s)) for s in (0, 0.001, 0.9994, 59.9, 61, 86400 * 30))


def test_estimate_is_characters_over_four_plus_max_tokens() -> None:
    chat = GenerateJob(
        request_id="r",
        model=MODEL,
        endpoint="chat.completions",
        messages=[Message(role="user", content="x" * 40)],
    )
    # "user" + 40 characters: 44 / 4.
    assert estimate_tokens(chat) == 11
    chat.sampling = SamplingOptions(max_tokens=8, n=2)
    assert estimate_tokens(chat) == 11 + 16
    completion = GenerateJob(request_id="r", model=MODEL, endpoint="completions", prompt="abcde")
    assert estimate_tokens(completion) == 2
    # Token ids count one each.
    embed = EmbedJob(request_id="r", model=MODEL, inputs=["abcd" * 10, [1, 2, 3]])
    assert estimate_tokens(embed) == 13


def test_batch_estimate_reads_the_prompts_of_every_line() -> None:
    lines = [
        chat_line("a", "x" * 96),  # "user" + 96: 25 tokens
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "y" * 40},
        },
        {"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"input": ["z" * 8]}},
    ]
    data = jsonl(lines) + b"not json at all!\n\n"
    expected = 25 + 10 + 2 + 4
    assert batch_quota.estimate_chunks([data]) == expected
    # Wherever the stored chunks split the lines.
    for size in (1, 7, 64):
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        assert batch_quota.estimate_chunks(pieces) == expected
    # A line too long to parse is counted at its length, not kept whole.
    huge = b"a" * (batch_quota.MAX_PARSED_LINE + 3) + b"\n"
    chunks = [huge[i : i + 65536] for i in range(0, len(huge), 65536)]
    assert batch_quota.estimate_chunks([*chunks, data]) == math.ceil((len(huge) - 1) / 4) + expected


# -- the batch allowance in the database --------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'inferq.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _batch_file(db: Engine, owner: str, tokens_per_line: int, n: int) -> str:
    # "user" + content: 4 characters per token.
    lines = [chat_line(f"l{i}", "x" * (4 * tokens_per_line - 4)) for i in range(n)]
    record = files_store.create_file(
        db, filename="in.jsonl", purpose="batch", chunks=[jsonl(lines)], max_bytes=None, owner=owner
    )
    return record.id


def test_allowance_check_and_insert_are_atomic(db: Engine) -> None:
    info, _ = create_key(db, name="batches", limits=Limits(batch_tokens=100))
    principal = Principal(info)
    file_id = _batch_file(db, info.id, tokens_per_line=30, n=2)
    create = protocol.BatchCreate(input_file_id=file_id, endpoint="/v1/chat/completions")
    made: list[BatchRecord] = []
    refused: list[APIError] = []
    start = threading.Barrier(3)

    def attempt() -> None:
        start.wait()
        try:
            made.append(batch_quota.create_batch(db, create=create, principal=principal))
        except APIError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # 60 tokens each against 100: exactly one of three concurrent creates fits.
    assert len(made) == 1 and len(refused) == 2
    assert made[0].estimated_tokens == 60 and made[0].owner == info.id
    error = refused[0]
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert "60 tokens enqueued" in error.message and "100" in error.message
    # Ended or cancelling batches hold nothing of it.
    for status in ("cancelling", "cancelled", "completed", "failed", "expired"):
        with db.begin() as conn:
            conn.execute(
                update(BatchRecord).where(BatchRecord.owner == info.id).values(status=status)
            )
        again = batch_quota.create_batch(db, create=create, principal=principal)
        with db.begin() as conn:
            conn.execute(
                update(BatchRecord).where(BatchRecord.id == again.id).values(status="cancelled")
            )
    # A key without an allowance is not estimated or refused.
    free, _ = create_key(db, name="free")
    for _ in range(3):
        record = batch_quota.create_batch(db, create=create, principal=Principal(free))
        assert record.estimated_tokens == 0


# -- against a running fleet -----------------------------------------------------------


@pytest.fixture(scope="module")
def second_api(accounts: Fleet) -> Iterator[str]:
    """A second API process of the same deployment (same Redis, same
    database), without a batch scheduler of its own."""
    port = free_port()
    env = {**accounts.env, "INFERQ_PORT": str(port), "INFERQ_BATCH_SCHEDULER": "false"}
    proc = inferq(["api"], env, accounts.log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_status(url + "/health", 200, 60, accounts.log)
        yield url
    finally:
        stop(proc)


def chat(url: str, token: str, *, content: str = "hi", **extra: Any) -> httpx.Response:
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }
    return httpx.post(url + "/v1/chat/completions", json=body, headers=as_key(token), timeout=60)


def rate_headers(response: httpx.Response, kind: str) -> dict[str, str]:
    got = {h: response.headers.get(f"x-ratelimit-{h}-{kind}") for h in HEADERS}
    assert all(v is not None for v in got.values()), response.headers
    assert DURATION.match(got["reset"] or ""), got
    return {k: v for k, v in got.items() if v is not None}


def usage_rows(fleet: Fleet, key_id: str, *, at_least: int, timeout: float) -> int:
    rows = poll_usage(
        database_url=fleet.database_url,
        where="key_id = :k",
        params={"k": key_id},
        until=lambda found: len(found) >= at_least,
        timeout=timeout,
    )
    return len(rows)


def refusals(url: str, admin: str, kind: str) -> float:
    """inferq_rate_limited{kind} of one API process, read from its /metrics."""
    text = httpx.get(url + "/metrics", headers=as_key(admin), timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferq_rate_limited_total" and sample.labels["kind"] == kind:
                return sample.value
    return 0.0


def assert_refused(response: httpx.Response, kind: str, token: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == kind
    assert error["message"].startswith("Rate limit reached for ")
    assert "Please try again in " in error["message"]
    assert token not in response.text
    return {"retry_after": retry_after, **error}


def test_rpm_is_shared_by_two_api_processes(accounts: Fleet, second_api: str) -> None:
    token = new_key(accounts, "rpm", rpm=3)
    key_id = token_id(token)
    assert key_id is not None
    remaining = []
    for url in (accounts.url, second_api, accounts.url):
        answer = chat(url, token)
        assert answer.status_code == 200, answer.text
        got = rate_headers(answer, "requests")
        assert got["limit"] == "3"
        remaining.append(got["remaining"])
        # No tpm: no token headers.
        assert "x-ratelimit-limit-tokens" not in answer.headers
    assert remaining == ["2", "1", "0"]
    assert usage_rows(accounts, key_id, at_least=3, timeout=20) == 3
    admin = new_key(accounts, "metrics", admin=True)
    before = refusals(second_api, admin, "requests")
    # The fourth, on the other process, is over the limit both counted.
    fourth = chat(second_api, token)
    refused = assert_refused(fourth, "requests", token)
    assert refusals(second_api, admin, "requests") == before + 1
    # A refusal carries the headers too.
    assert rate_headers(fourth, "requests")["remaining"] == "0"
    # One request comes back every 20 s.
    assert refused["retry_after"] <= 20
    assert "requests per min (RPM): Limit 3, Used 3, Requested 1." in refused["message"]
    # Nothing was enqueued for it: no worker ran it, so no usage row came.
    assert usage_rows(accounts, key_id, at_least=4, timeout=3) == 3


def test_a_key_without_limits_has_no_buckets_and_no_headers(accounts: Fleet) -> None:
    token = new_key(accounts, "unlimited")
    answer = chat(accounts.url, token)
    assert answer.status_code == 200
    assert not any(h.startswith("x-ratelimit-") for h in answer.headers)
    client = redis.Redis.from_url(accounts.env["REDIS_URL"])
    try:
        assert not client.keys(keys.rate_bucket(token_id(token) or "", "*"))
    finally:
        client.close()


def test_tpm_is_shared_and_settled_with_the_real_tokens(accounts: Fleet, second_api: str) -> None:
    token = new_key(accounts, "tpm", tpm=100)
    key_id = token_id(token)
    assert key_id is not None
    # Estimated far above 100 tokens: capped at the bucket, it takes all of it.
    first = chat(accounts.url, token, content="hello " * 60, max_tokens=100, ignore_eos=True)
    assert first.status_code == 200, first.text
    got = rate_headers(first, "tokens")
    assert got["limit"] == "100" and got["remaining"] == "0"
    assert "x-ratelimit-limit-requests" not in first.headers
    used = first.json()["usage"]
    assert used["completion_tokens"] == 100
    # The other process sees the same empty bucket.
    refused = assert_refused(chat(second_api, token, max_tokens=50), "tokens", token)
    assert "tokens per min (TPM): Limit 100" in refused["message"]
    # The worker settled it with the real count (prompt + 100 > the 100
    # reserved): the bucket is in debt, which delays the next request.
    bucket = keys.rate_bucket(key_id, "tpm")
    client = redis.Redis.from_url(accounts.env["REDIS_URL"])
    try:
        deadline = time.monotonic() + 20
        while float(client.hget(bucket, "level") or 0) >= 0:
            assert time.monotonic() < deadline, "the worker never settled the bucket"
            time.sleep(0.1)
    finally:
        client.close()
    again = assert_refused(chat(accounts.url, token, max_tokens=1), "tokens", token)
    assert again["retry_after"] >= 2


def test_quota_windows_apply_per_model(accounts: Fleet) -> None:
    token = new_key(
        accounts,
        "quotas",
        quotas=[
            QuotaRule(model=MODEL, window=3600, max_requests=2),
            # Another model's tighter rule does not apply to this one.
            QuotaRule(model="other", window=60, max_requests=1),
            QuotaRule(window=86400, max_tokens=1000),
        ],
    )
    remaining = []
    for _ in range(2):
        answer = chat(accounts.url, token)
        assert answer.status_code == 200, answer.text
        got = rate_headers(answer, "requests")
        assert got["limit"] == "2"
        remaining.append(got["remaining"])
        assert rate_headers(answer, "tokens")["limit"] == "1000"
    assert remaining == ["1", "0"]
    refused = assert_refused(chat(accounts.url, token), "requests", token)
    assert f"requests per 1h (quota on model '{MODEL}')" in refused["message"]
    # Two requests an hour: one comes back in 30 minutes.
    assert 1700 <= refused["retry_after"] <= 1800


def test_token_quota_on_every_model(accounts: Fleet) -> None:
    token = new_key(accounts, "daily", quotas=[QuotaRule(window=86400, max_tokens=30)])
    # A streamed answer carries the headers too (they go out before the body).
    streamed = chat(accounts.url, token, max_tokens=20, stream=True)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    assert rate_headers(streamed, "tokens")["limit"] == "30"
    refused = assert_refused(chat(accounts.url, token, max_tokens=20), "tokens", token)
    assert "tokens per 1d (quota on every model): Limit 30" in refused["message"]


def _submit(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return file.id


def test_batch_over_its_allowance_is_refused_at_create(accounts: Fleet) -> None:
    token = new_key(accounts, "batches", batch_tokens=100)
    client = openai_as(accounts, token)
    # Model `other` has no worker: the batch stays enqueued. "user" + 100
    # characters: 26 tokens a line, 52 a file.
    lines = [chat_line(f"l{i}", "x" * 100, model="other", max_tokens=2) for i in range(2)]
    first = client.batches.create(
        input_file_id=_submit(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    second_file = _submit(client, lines)
    with pytest.raises(openai.RateLimitError) as caught:
        client.batches.create(
            input_file_id=second_file, endpoint="/v1/chat/completions", completion_window="24h"
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "rate_limit_exceeded"
    assert "52 tokens enqueued" in error["message"]
    assert "allowance is 100 tokens" in error["message"] and "estimated at 52" in error["message"]
    # The refused batch was never created.
    assert [b.id for b in client.batches.list()] == [first.id]
    # Cancelling the first gives its share back.
    client.batches.cancel(first.id)
    second = client.batches.create(
        input_file_id=second_file, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert second.status in ("validating", "in_progress")
    client.batches.cancel(second.id)
