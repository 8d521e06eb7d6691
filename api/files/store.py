"""Files (the OpenAI Files API) in the database: metadata in `files`, bytes in
`file_chunks` rows of CHUNK_BYTES, written and read one chunk at a time so a
200 MB upload never sits whole in memory. Keyword-only functions on a
synchronous engine: the API calls them in its thread pool, the batch
scheduler on its own thread."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session

from schemas.tables import FileChunk, FileRecord, aware, plausible_id, utcnow

CHUNK_BYTES = 4 * 1024 * 1024


class FileTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than the {limit}-byte limit")
        self.limit = limit


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def create_file(
    db: Engine,
    *,
    filename: str,
    purpose: str,
    chunks: Iterable[bytes],
    max_bytes: int | None,
    chunk_bytes: int = CHUNK_BYTES,
    owner: str | None = None,
) -> FileRecord:
    """Store a file; FileTooLarge (and nothing left behind) past `max_bytes`.
    Until its last chunk is in, the file's status is "uploaded" and nobody
    lists it."""
    record = FileRecord(
        id=f"file-{uuid.uuid4().hex[:24]}",
        created_at=utcnow(),
        # Postgres refuses NUL in text.
        filename=filename.replace("\x00", "")[:512] or "upload",
        purpose=purpose,
        bytes=0,
        status="uploaded",
        owner=owner,
    )
    with Session(db, expire_on_commit=False) as session, session.begin():
        session.add(record)
    size = 0
    try:
        for seq, piece in enumerate(_rechunk(chunks, chunk_bytes)):
            size += len(piece)
            if max_bytes is not None and size > max_bytes:
                raise FileTooLarge(max_bytes)
            with db.begin() as conn:
                conn.execute(insert(FileChunk), {"file_id": record.id, "seq": seq, "data": piece})
    except BaseException:
        delete_file(db, file_id=record.id)
        raise
    with db.begin() as conn:
        conn.execute(
            update(FileRecord)
            .where(FileRecord.id == record.id)
            .values(bytes=size, status="processed")
        )
    record.bytes, record.status = size, "processed"
    return record


def _visible(record: FileRecord | None, owner_filter: str | None) -> FileRecord | None:
    """`record` when it is a whole file the caller may see (`owner_filter`:
    the only owner it sees, None for everything), else None: another key's
    file looks exactly like a missing one."""
    if record is None or record.status != "processed":
        return None
    if owner_filter is not None and record.owner != owner_filter:
        return None
    return record


def get_file(db: Engine, *, file_id: str, owner_filter: str | None = None) -> FileRecord | None:
    if not plausible_id(file_id):
        return None
    with Session(db, expire_on_commit=False) as session:
        record = session.get(FileRecord, file_id)
    return _visible(record, owner_filter)


def list_files(
    db: Engine,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10000,
    order: str = "desc",
    owner_filter: str | None = None,
) -> tuple[list[FileRecord], bool]:
    """A page of files; `owner_filter`: only that owner's (None: everyone's).
    An `after` the caller cannot see is ignored like an unknown id, so a page
    tells nothing about other keys' files."""
    newest_first = order != "asc"
    key = (FileRecord.created_at, FileRecord.id)
    query = select(FileRecord).where(FileRecord.status == "processed")
    if owner_filter is not None:
        query = query.where(FileRecord.owner == owner_filter)
    if purpose is not None:
        if "\x00" in purpose:
            return [], False
        query = query.where(FileRecord.purpose == purpose)
    with Session(db, expire_on_commit=False) as session:
        if (
            after is not None
            and plausible_id(after)
            and (anchor := _visible(session.get(FileRecord, after), owner_filter)) is not None
        ):
            if newest_first:
                query = query.where(
                    (key[0] < anchor.created_at)
                    | ((key[0] == anchor.created_at) & (key[1] < anchor.id))
                )
            else:
                query = query.where(
                    (key[0] > anchor.created_at)
                    | ((key[0] == anchor.created_at) & (key[1] > anchor.id))
                )
        ordering = [k.desc() for k in key] if newest_first else list(key)
        rows = list(session.scalars(query.order_by(*ordering).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def iter_content(db: Engine, *, file_id: str) -> Iterator[bytes]:
    """The file's bytes, one chunk (one query) at a time."""
    seq = 0
    while True:
        with db.connect() as conn:
            data = conn.execute(
                select(FileChunk.data).where(FileChunk.file_id == file_id, FileChunk.seq == seq)
            ).scalar_one_or_none()
        if data is None:
            return
        yield bytes(data)
        seq += 1


def delete_file(db: Engine, *, file_id: str, owner_filter: str | None = None) -> bool:
    """False when there is no such file, or it is not `owner_filter`'s (when
    given): then nothing is deleted."""
    if not plausible_id(file_id):
        return False
    with db.begin() as conn:
        if owner_filter is not None:
            owner = conn.execute(
                select(FileRecord.owner).where(FileRecord.id == file_id).with_for_update()
            ).first()
            if owner is None or owner[0] != owner_filter:
                return False
        # Not left to ON DELETE CASCADE: SQLite only cascades on connections
        # with PRAGMA foreign_keys=ON, which an engine not from make_engine lacks.
        conn.execute(delete(FileChunk).where(FileChunk.file_id == file_id))
        return bool(conn.execute(delete(FileRecord).where(FileRecord.id == file_id)).rowcount)


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(aware(record.created_at).timestamp()),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
