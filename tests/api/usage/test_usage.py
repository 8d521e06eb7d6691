"""GET /v1/usage and the Batch object's `usage`, through the official openai
client with several keys: the sums match the tokens the responses reported,
for direct requests and for batch lines (also when the worker is killed in
the middle of the batch); a key sees only its own usage, an admin sees every
key's and can filter by key; grouping by day, model, key and endpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai

from tests.api.usage.helpers import (
    Key,
    Tokens,
    get_usage,
    make_key,
    sums,
    total,
    usage_page,
    wait_usage,
)
from tests.support.accounts import accounts, openai_as
from tests.support.batches import numbered_lines, output_in_order, submit, wait, wait_for
from tests.support.deploy import MODEL
from tests.support.fleet import Fleet

__all__ = ["accounts"]

ZERO = Tokens().result()


def chat(client: openai.OpenAI, content: str, max_tokens: int, spent: Tokens) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
    )
    assert answer.usage is not None
    spent.add(answer.usage.prompt_tokens, answer.usage.completion_tokens)


def streamed_chat(client: openai.OpenAI, content: str, spent: Tokens) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1
    spent.add(usage[0].prompt_tokens, usage[0].completion_tokens)


def completion(client: openai.OpenAI, prompt: str, max_tokens: int, spent: Tokens) -> None:
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
    assert answer.usage is not None
    spent.add(answer.usage.prompt_tokens, answer.usage.completion_tokens)


def llama_completion(fleet: Fleet, key: Key, prompt: str, spent: Tokens) -> int:
    """llama-server's /completion, which reports the prompt tokens it took
    from the cache; returns them."""
    body = {"prompt": prompt, "n_predict": 2, "temperature": 0}
    response = httpx.post(
        fleet.url + "/completion",
        json=body,
        headers={"Authorization": f"Bearer {key.token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    out = response.json()
    cached = int(out["tokens_cached"])
    spent.add(int(out["tokens_evaluated"]), int(out["tokens_predicted"]), cached)
    return cached


def of_key(page: dict[str, Any], key_id: str) -> list[dict[str, Any]]:
    return [r for b in page["data"] for r in b["results"] if r["api_key_id"] == key_id]


def test_direct_requests_are_summed_per_key(accounts: Fleet) -> None:
    alice = make_key(accounts, "alice-direct")
    bob = make_key(accounts, "bob-direct")
    admin = make_key(accounts, "admin-direct", admin=True)
    spent = {alice.id: Tokens(), bob.id: Tokens()}
    as_alice = openai_as(accounts, alice.token)
    for i in range(3):
        chat(as_alice, f"hello number {i}", 4 + i, spent[alice.id])
    streamed_chat(as_alice, "a streamed hello", spent[alice.id])
    completion(as_alice, "once upon a time", 7, spent[alice.id])
    # Bob uses llama-server's /completion, which reports the prompt tokens
    # it reused; the same long prompt twice: the second comes from the cache.
    prompt = "the old man and the sea " * 6
    llama_completion(accounts, bob, "something else entirely", spent[bob.id])
    llama_completion(accounts, bob, prompt, spent[bob.id])
    assert llama_completion(accounts, bob, prompt, spent[bob.id]) > 0

    for key in (alice, bob):
        expected = spent[key.id].result()
        page = wait_usage(accounts, key.token, requests=expected["num_model_requests"])
        assert page["object"] == "page" and len(page["data"]) == 1
        (bucket,) = page["data"]
        assert bucket["object"] == "bucket" and bucket["start_time"] < bucket["end_time"]
        (result,) = bucket["results"]
        if key is alice:
            # The OpenAI answers do not say how much of the prompt came from
            # the cache (the chats share their template's prefix): some, at most all.
            assert 0 <= result["input_cached_tokens"] <= expected["input_tokens"]
            spent[alice.id].cached = result["input_cached_tokens"]
            expected = spent[alice.id].result()
        assert sums(result) == expected

    # One key never sees the other's rows, not even when it names the other key.
    assert total(usage_page(accounts, alice.token, [("key_id", bob.id)])) == ZERO
    by_key = usage_page(accounts, alice.token, [("group_by", "key")])
    assert [r["api_key_id"] for b in by_key["data"] for r in b["results"]] == [alice.id]

    # An admin sees both, and filters by key.
    everyone = usage_page(accounts, admin.token, [("group_by", "key")])
    for key in (alice, bob):
        (row,) = of_key(everyone, key.id)
        assert sums(row) == spent[key.id].result()
    only_bob = usage_page(accounts, admin.token, [("group_by", "key"), ("key_id", bob.id)])
    assert [r["api_key_id"] for b in only_bob["data"] for r in b["results"]] == [bob.id]
    both = usage_page(accounts, admin.token, [("key_id", f"{alice.id},{bob.id}")])
    assert total(both) == (spent[alice.id] + spent[bob.id]).result()


def known(result: dict[str, Any]) -> dict[str, int]:
    """The sums an OpenAI answer reports (it does not say how many prompt
    tokens came from the cache)."""
    out = sums(result)
    del out["input_cached_tokens"]
    return out


def test_group_by_day_model_endpoint(accounts: Fleet) -> None:
    carol = make_key(accounts, "carol-groups")
    client = openai_as(accounts, carol.token)
    chats, completions = Tokens(), Tokens()
    chat(client, "first", 5, chats)
    chat(client, "second", 3, chats)
    completion(client, "a prompt", 4, completions)
    everything = chats + completions
    whole = total(wait_usage(accounts, carol.token, requests=3))
    assert known(whole) == known(everything.result())

    # Every grouping splits the same sums (cached tokens included).
    by_endpoint = usage_page(accounts, carol.token, [("group_by", "endpoint")])
    assert total(by_endpoint) == whole
    (bucket,) = by_endpoint["data"]
    found = {r["endpoint"]: known(r) for r in bucket["results"]}
    assert found == {
        "chat.completions": known(chats.result()),
        "completions": known(completions.result()),
    }
    assert all(r["model"] is None and r["api_key_id"] is None for r in bucket["results"])

    by_model = usage_page(accounts, carol.token, [("group_by", "model")])
    assert [(r["model"], sums(r)) for b in by_model["data"] for r in b["results"]] == [
        (MODEL, whole)
    ]

    today = datetime.now(UTC).date()
    midnight = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())
    by_day = usage_page(accounts, carol.token, [("group_by", "day")])
    # Day buckets are UTC days; the requests were all made today.
    assert [(b["start_time"], b["end_time"]) for b in by_day["data"]] == [
        (midnight, midnight + 86400)
    ]
    assert total(by_day) == whole

    # Several groups, comma-separated or repeated: the same answer.
    comma = usage_page(accounts, carol.token, [("group_by", "day,model,endpoint")])
    repeated = usage_page(
        accounts,
        carol.token,
        [("group_by", "endpoint"), ("group_by", "day"), ("group_by", "model")],
    )
    assert comma == repeated
    (day,) = comma["data"]
    assert {(r["model"], r["endpoint"]): known(r) for r in day["results"]} == {
        (MODEL, "chat.completions"): known(chats.result()),
        (MODEL, "completions"): known(completions.result()),
    }
    assert total(comma) == whole

    # The range: start inclusive, end exclusive; unix seconds or ISO dates.
    iso_today = today.isoformat()
    assert total(usage_page(accounts, carol.token, [("end", iso_today)])) == ZERO
    assert total(usage_page(accounts, carol.token, [("start", iso_today)])) == whole
    later = int((datetime.now(UTC) + timedelta(hours=1)).timestamp())
    window = usage_page(accounts, carol.token, [("start", later - 7200), ("end", later)])
    assert total(window) == whole
    assert (window["data"][0]["start_time"], window["data"][0]["end_time"]) == (
        later - 7200,
        later,
    )
    assert total(usage_page(accounts, carol.token, [("start", later)])) == ZERO


def test_bad_parameters_get_400(accounts: Fleet) -> None:
    dave = make_key(accounts, "dave-params")
    for params, param in [
        ([("group_by", "color")], "group_by"),
        ([("group_by", "model,")], None),
        ([("start", "yesterday")], "start"),
        ([("end", "99999999999999")], "end"),
        ([("start", "2026-13-01")], "start"),
        ([("start", "200"), ("end", "100")], "end"),
    ]:
        response = get_usage(accounts, dave.token, params)
        if param is None:
            # A trailing comma is no group: accepted.
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 400, (params, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert isinstance(error["code"], str) and error["message"]
    # An id that cannot be one matches nothing (not everything, not a 500).
    admin = make_key(accounts, "admin-params", admin=True)
    for junk in ("bad\x00id", "x" * 5000):
        assert total(usage_page(accounts, admin.token, [("key_id", junk)])) == ZERO
    missing = httpx.get(accounts.url + "/v1/usage", timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"


LINES = 120


def test_batch_lines_are_counted_once_across_a_worker_kill(accounts: Fleet) -> None:
    erin = make_key(accounts, "erin-batch")
    frank = make_key(accounts, "frank-batch")
    client = openai_as(accounts, erin.token)
    batch = submit(client, numbered_lines(LINES, max_tokens=48))
    running = wait_for(client, batch.id, 60, done=LINES // 12)
    # The kill must hit a batch with work left, or it proves nothing.
    assert running.status == "in_progress" and running.request_counts is not None
    assert running.request_counts.completed < LINES // 2
    accounts.wait_lines_running()
    accounts.kill_worker("worker")
    accounts.start_worker("worker", wait=False)
    batch = wait(client, batch.id, 240)
    assert batch.status == "completed", (batch, accounts.log.read_text()[-4000:])
    # Lines the dead worker held ran again on the new one.
    assert accounts.max_attempts() >= 2

    reported = Tokens()
    for line in output_in_order(client, batch, LINES):
        usage = line["response"]["body"]["usage"]
        assert usage["completion_tokens"] == 48
        reported.add(usage["prompt_tokens"], usage["completion_tokens"])
    # Rows are written with the line results, so they are all in already:
    # one per line, none lost with the dead worker, none doubled by the rerun.
    page = usage_page(accounts, erin.token, [("group_by", "endpoint,model")])
    (bucket,) = page["data"]
    (row,) = bucket["results"]
    assert (row["endpoint"], row["model"]) == ("batch:chat.completions", MODEL)
    cached = row["input_cached_tokens"]
    assert sums(row) == {**reported.result(), "input_cached_tokens": cached}
    assert 0 <= cached <= reported.prompt

    # The Batch object's usage says the same.
    usage = client.batches.retrieve(batch.id).usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        reported.prompt,
        reported.completion,
        reported.prompt + reported.completion,
    )
    assert usage.input_tokens_details.cached_tokens == cached
    assert usage.output_tokens_details.reasoning_tokens == 0
    (listed,) = [b for b in client.batches.list() if b.id == batch.id]
    assert listed.usage == usage
    # Another key sees none of it.
    assert total(usage_page(accounts, frank.token)) == ZERO

    # The worker is back for the next requests.
    accounts.wait_live(accounts.workers["worker"].pid)
