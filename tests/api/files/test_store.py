"""The Files store on real Postgres: chunked round trips, limits, listing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, delete, func, select

from api.files import store as files_store
from schemas.tables import FileChunk, FileRecord


@pytest.fixture
def db(pg_engine: Engine) -> Engine:
    return pg_engine


def _chunks(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(FileChunk)).scalar_one())


def test_round_trip_over_many_chunks(db: Engine) -> None:
    data = bytes(range(256)) * 41  # 10,496 bytes
    pieces = [data[i : i + 999] for i in range(0, len(data), 999)]
    record = files_store.create_file(
        db, filename="in.jsonl", purpose="batch", chunks=pieces, max_bytes=None, chunk_bytes=1024
    )
    assert record.bytes == len(data) and record.status == "processed"
    assert _chunks(db) == 11  # 10 full 1 KiB rows and the rest
    assert b"".join(files_store.iter_content(db, file_id=record.id)) == data
    obj = files_store.file_object(record)
    assert obj["object"] == "file" and obj["bytes"] == len(data) and obj["purpose"] == "batch"


def test_too_large_leaves_nothing(db: Engine) -> None:
    with pytest.raises(files_store.FileTooLarge):
        files_store.create_file(
            db, filename="big", purpose="batch", chunks=[b"x" * 3000], max_bytes=2048,
            chunk_bytes=1024,
        )  # fmt: skip
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(FileRecord)).scalar_one() == 0
    assert _chunks(db) == 0


def test_list_pages_and_delete(db: Engine) -> None:
    ids = [
        files_store.create_file(
            db, filename=f"f{i}", purpose="batch" if i % 2 else "user_data",
            chunks=[b"{}\n"], max_bytes=None,
        ).id
        for i in range(5)
    ]  # fmt: skip
    first, more = files_store.list_files(db, limit=2)
    assert [r.id for r in first] == ids[::-1][:2] and more
    rest, more = files_store.list_files(db, limit=10, after=first[-1].id)
    assert [r.id for r in rest] == ids[::-1][2:] and not more
    oldest, _ = files_store.list_files(db, limit=1, order="asc")
    assert oldest[0].id == ids[0]
    batch_only, _ = files_store.list_files(db, purpose="batch")
    assert {r.id for r in batch_only} == {ids[1], ids[3]}
    assert files_store.delete_file(db, file_id=ids[0])
    assert files_store.get_file(db, file_id=ids[0]) is None
    assert not files_store.delete_file(db, file_id=ids[0])
    assert _chunks(db) == 4


def test_unfinished_upload_is_invisible_and_content_is_read_lazily(db: Engine) -> None:
    seen_mid_upload: list[object] = []

    def pieces() -> Iterator[bytes]:
        yield b"a" * 1024
        # The first chunk is written; the file must not be listed or readable yet.
        seen_mid_upload.append(files_store.list_files(db)[0])
        with db.connect() as conn:
            file_id = conn.execute(select(FileRecord.id)).scalar_one()
        seen_mid_upload.append(files_store.get_file(db, file_id=file_id))
        yield b"b" * 1024

    record = files_store.create_file(
        db, filename="f", purpose="batch", chunks=pieces(), max_bytes=None, chunk_bytes=1024
    )
    assert seen_mid_upload == [[], None]
    assert files_store.get_file(db, file_id=record.id) is not None

    # One chunk per query: a reader that got the first chunk sees the delete
    # before asking for the second.
    content = files_store.iter_content(db, file_id=record.id)
    assert next(content) == b"a" * 1024
    assert files_store.delete_file(db, file_id=record.id)
    assert list(content) == []


def test_database_cascade_removes_chunks(db: Engine) -> None:
    record = files_store.create_file(
        db, filename="f", purpose="batch", chunks=[b"x" * 3000], max_bytes=None, chunk_bytes=1024
    )
    assert _chunks(db) == 3
    with db.begin() as conn:
        conn.execute(delete(FileRecord).where(FileRecord.id == record.id))
    assert _chunks(db) == 0
