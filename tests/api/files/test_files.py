"""The OpenAI Files API end to end, through the official client, against
`inferq api` on real Postgres (the session's stack)."""

from __future__ import annotations

import io
import os

import openai
import pytest

from tests.support.stack import Stack


def test_upload_retrieve_list_download_delete(stack: Stack) -> None:
    client = stack.client()
    # Random bytes over two 4 MiB rows and a partial third: byte order, chunk
    # seams and non-UTF-8 content all have to survive.
    data = os.urandom(9 * 1024 * 1024 + 123)
    created = client.files.create(file=("big.bin", io.BytesIO(data)), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(data) and created.filename == "big.bin"
    assert created.purpose == "batch" and created.status == "processed"
    assert created.created_at > 0

    retrieved = client.files.retrieve(created.id)
    assert retrieved == created

    assert created.id in {f.id for f in client.files.list(purpose="batch")}
    assert created.id not in {f.id for f in client.files.list(purpose="user_data")}

    assert client.files.content(created.id).content == data

    deleted = client.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    assert created.id not in {f.id for f in client.files.list()}


def test_list_paginates_through_the_client(stack: Stack) -> None:
    client = stack.client()
    ids = [
        client.files.create(file=(f"n{i}.txt", io.BytesIO(b"%d\n" % i)), purpose="user_data").id
        for i in range(3)
    ]
    # limit=1 makes the client follow has_more/after page by page; other tests'
    # files share the database, so look at this test's files only.
    newest_first = [f.id for f in client.files.list(purpose="user_data", limit=1)]
    assert [i for i in newest_first if i in ids] == ids[::-1]
    oldest_first = [f.id for f in client.files.list(purpose="user_data", order="asc", limit=2)]
    assert [i for i in oldest_first if i in ids] == ids
    page = client.files.list(purpose="user_data", limit=1, after=ids[2])
    assert page.data[0].id == ids[1] and page.has_more
    for file_id in ids:
        client.files.delete(file_id)


def test_errors_in_the_openai_envelope(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.retrieve("file-000000000000000000000000")
    assert missing.value.code == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        client.files.delete("file-000000000000000000000000")
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert bad.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as empty:
        client.files.create(file=("x.jsonl", io.BytesIO(b"")), purpose="batch")
    assert empty.value.param == "file"
