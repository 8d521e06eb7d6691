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


def get_file(db: Engine, *, file_id: str) -> FileRecord | None:
    if not plausible_id(file_id):
        return None
    with Session(db, expire_on_commit=False) as session:
        record = session.get(FileRecord, file_id)
    return record if record is not None and record.status == "processed" else None


def list_files(
    db: Engine,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10000,
    order: str = "desc",
) -> tuple[list[FileRecord], bool]:
    newest_first = order != "asc"
    key = (FileRecord.created_at, FileRecord.id)
    query = select(FileRecord).where(FileRecord.status == "processed")
    if purpose is not None:
        if "\x00" in purpose:
            return [], False
        query = query.where(FileRecord.purpose == purpose)
    with Session(db, expire_on_commit=False) as session:
        if (
            after is not None
            and plausible_id(after)
            and (anchor := session.get(FileRecord, after)) is not None
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


def delete_file(db: Engine, *, file_id: str) -> bool:
    if not plausible_id(file_id):
        return False
    with db.begin() as conn:
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
