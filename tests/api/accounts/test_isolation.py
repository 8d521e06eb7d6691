"""What one key may see of another's: files, batches and their result files
belong to the key that made them; another ordinary key gets the same 404 as
for an id that does not exist and never sees them listed; an admin key sees
everything. A key limited to some models finds no other."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.support.accounts import accounts, http_as, new_key, openai_as
from tests.support.batches import chat_line, jsonl, read_lines, wait
from tests.support.deploy import MODEL
from tests.support.fleet import Fleet

__all__ = ["accounts"]

MISSING_FILE = "file-" + "0" * 24
MISSING_BATCH = "batch_" + "0" * 32
UNSERVED = "other"  # configured in the fleet's models, served by no worker


def _refusal(call: Callable[[str], object], target: str) -> dict[str, Any]:
    with pytest.raises(openai.NotFoundError) as caught:
        call(target)
    body = caught.value.body
    assert isinstance(body, dict)
    return body


def same_as_missing(call: Callable[[str], object], hidden: str, missing: str) -> None:
    """`call` on another key's id fails exactly as on an id that does not
    exist: a 404, the same body word for word but for the id it names."""
    seen = _refusal(call, hidden)
    assert str(seen).replace(hidden, missing) == str(_refusal(call, missing))


def upload(client: openai.OpenAI, lines: list[dict[str, Any]], name: str) -> str:
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch").id


def file_ids(client: openai.OpenAI, **query: Any) -> list[str]:
    # Iterating the page follows `has_more`/`after`: pagination included.
    return [f.id for f in client.files.list(limit=2, **query)]


def batch_ids(client: openai.OpenAI, **query: Any) -> list[str]:
    return [b.id for b in client.batches.list(limit=2, **query)]


def test_files_belong_to_their_key(accounts: Fleet) -> None:
    alice = openai_as(accounts, new_key(accounts, "alice"))
    bob = openai_as(accounts, new_key(accounts, "bob"))
    admin = openai_as(accounts, new_key(accounts, "root", admin=True))
    mine = [upload(alice, [chat_line(f"a{i}", "hi")], f"alice{i}.jsonl") for i in range(3)]
    theirs = [upload(bob, [chat_line(f"b{i}", "hi")], f"bob{i}.jsonl") for i in range(3)]
    secret = mine[0]

    # Lists, page after page: each key its own, the admin everyone's.
    assert set(file_ids(alice)) >= set(mine) and not set(file_ids(alice)) & set(theirs)
    assert set(file_ids(bob)) >= set(theirs) and not set(file_ids(bob)) & set(mine)
    assert set(file_ids(admin)) >= set(mine) | set(theirs)
    # A cursor on another key's file tells nothing: as if it did not exist.
    for order in ("asc", "desc"):
        assert file_ids(bob, after=secret, order=order) == file_ids(
            bob, after=MISSING_FILE, order=order
        )
    assert not set(file_ids(bob, purpose="batch")) & set(mine)

    # Retrieve, content and delete: the 404 of an id that does not exist.
    same_as_missing(lambda i: bob.files.retrieve(i), secret, MISSING_FILE)
    same_as_missing(lambda i: bob.files.content(i), secret, MISSING_FILE)
    same_as_missing(lambda i: bob.files.delete(i), secret, MISSING_FILE)
    # Bob's delete did nothing.
    content = alice.files.content(secret).text
    assert '"custom_id": "a0"' in content
    assert alice.files.retrieve(secret).filename == "alice0.jsonl"
    # The admin reads everyone's.
    assert admin.files.content(secret).text == content
    assert admin.files.retrieve(theirs[0]).filename == "bob0.jsonl"
    # Each key deletes its own.
    assert bob.files.delete(theirs[0]).deleted
    assert alice.files.delete(mine[1]).deleted
    assert mine[1] not in file_ids(admin)


def test_batches_and_their_results_belong_to_their_key(accounts: Fleet) -> None:
    alice = openai_as(accounts, new_key(accounts, "alice"))
    bob = openai_as(accounts, new_key(accounts, "bob"))
    admin = openai_as(accounts, new_key(accounts, "root", admin=True))
    lines = [chat_line("ok", "hello", max_tokens=4), chat_line("bad", "hi", model="no-such")]
    alice_file = upload(alice, lines, "alice.jsonl")
    bob_file = upload(bob, [chat_line("bob", "hello", max_tokens=4)], "bob.jsonl")

    def create(client: openai.OpenAI, file_id: str) -> Any:
        return client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )

    # Another key's input file is no input file at all.
    same_as_missing(lambda i: create(bob, i), alice_file, MISSING_FILE)
    alices = create(alice, alice_file).id
    bobs = create(bob, bob_file).id

    same_as_missing(lambda i: bob.batches.retrieve(i), alices, MISSING_BATCH)
    same_as_missing(lambda i: bob.batches.cancel(i), alices, MISSING_BATCH)
    assert bobs in batch_ids(bob) and alices not in batch_ids(bob)
    assert alices in batch_ids(alice) and bobs not in batch_ids(alice)
    assert batch_ids(bob, after=alices) == batch_ids(bob, after=MISSING_BATCH)
    assert {alices, bobs} <= set(batch_ids(admin))

    # Bob's cancel did nothing: Alice's batch runs to its end.
    done = wait(alice, alices, 120)
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == 1
    assert wait(bob, bobs, 120).status == "completed"
    output, errors = done.output_file_id, done.error_file_id
    assert output is not None and errors is not None
    assert [line["custom_id"] for line in read_lines(alice, output)] == ["ok"]
    assert [line["custom_id"] for line in read_lines(alice, errors)] == ["bad"]

    # Her result files are hers, like her input.
    for result in (output, errors):
        assert result in file_ids(alice) and result not in file_ids(bob)
        same_as_missing(lambda i: bob.files.retrieve(i), result, MISSING_FILE)
        same_as_missing(lambda i: bob.files.content(i), result, MISSING_FILE)
        same_as_missing(lambda i: bob.files.delete(i), result, MISSING_FILE)
        assert admin.files.content(result).text == alice.files.content(result).text
    bob_output = bob.batches.retrieve(bobs).output_file_id
    assert bob_output is not None and bob_output not in file_ids(alice)
    assert admin.batches.retrieve(alices).output_file_id == output
    assert {output, errors, bob_output} <= set(file_ids(admin))


def test_a_key_sees_only_its_models(accounts: Fleet) -> None:
    served_only = openai_as(accounts, new_key(accounts, "served", models=[MODEL]))
    unserved_only = new_key(accounts, "unserved", models=[UNSERVED])
    limited = openai_as(accounts, unserved_only)
    anyone = openai_as(accounts, new_key(accounts, "anyone"))

    def refused(call: Callable[[], object]) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "model_not_found"

    messages: Any = [{"role": "user", "content": "hi"}]
    assert served_only.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    refused(lambda: limited.chat.completions.create(model=MODEL, messages=messages, max_tokens=2))
    refused(lambda: limited.completions.create(model=MODEL, prompt="hi", max_tokens=2))
    # Refused before anything is queued for a model no worker serves.
    refused(
        lambda: served_only.chat.completions.create(model=UNSERVED, messages=messages, max_tokens=2)
    )
    # The tiny model embeds nothing: any key is told so, but a key that may
    # not use it is told only that there is no such model.
    with pytest.raises(openai.BadRequestError) as unsupported:
        anyone.embeddings.create(model=MODEL, input="hi")
    assert unsupported.value.code == "unsupported_model"
    refused(lambda: limited.embeddings.create(model=MODEL, input="hi"))

    assert [m.id for m in served_only.models.list()] == [MODEL]
    assert [m.id for m in limited.models.list()] == [UNSERVED]
    assert {m.id for m in anyone.models.list()} == {MODEL, UNSERVED}
    refused(lambda: limited.models.retrieve(MODEL))
    assert limited.models.retrieve(UNSERVED).id == UNSERVED

    # llama-server's routes that run no job check the key's models too.
    with http_as(accounts, unserved_only) as http:
        for method, path, body in (
            ("POST", "/tokenize", {"model": MODEL, "content": "hi"}),
            ("POST", "/detokenize", {"model": MODEL, "tokens": [1]}),
            ("GET", f"/props?model={MODEL}", None),
            ("POST", "/apply-template", {"model": MODEL, "messages": messages}),
            ("POST", "/completion", {"model": MODEL, "prompt": "hi", "n_predict": 2}),
        ):
            answer = http.request(method, path, json=body)
            assert answer.status_code == 404, (path, answer.text)
            assert answer.json()["error"]["code"] == "model_not_found", path


def test_batch_lines_keep_to_the_key_s_models(accounts: Fleet) -> None:
    # A key may not reach through a batch what it may not call directly.
    limited = openai_as(accounts, new_key(accounts, "batch-limited", models=[UNSERVED]))
    file_id = upload(limited, [chat_line("mine", "hello", max_tokens=4)], "limited.jsonl")
    created = limited.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait(limited, created.id, 120)
    assert done.request_counts is not None and done.request_counts.completed == 0
    assert done.status in ("completed", "failed"), done
    refused = read_lines(limited, done.error_file_id) if done.error_file_id else []
    codes = [line["response"]["body"]["error"]["code"] for line in refused if line["response"]]
    codes += [line["error"]["code"] for line in refused if line.get("error")]
    errors = [e.code for e in (done.errors.data or [])] if done.errors else []
    assert "model_not_found" in codes + errors, (refused, done.errors)
