"""/v1/files: OpenAI's Files API (uploads for bulk jobs, and their results)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from api import files_store
from api.deps import DbDep, SettingsDep
from api.errors import APIError

router = APIRouter(tags=["files"])

PURPOSES = ("batch", "user_data")
READ_BYTES = 1024 * 1024


def _missing(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", code="file_not_found", param="id")


@router.post("/v1/files")
async def upload_file(
    db: DbDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    if purpose not in PURPOSES:
        raise APIError(
            400, f"purpose must be one of {', '.join(PURPOSES)} (got '{purpose}')", param="purpose"
        )
    if file.size == 0:
        raise APIError(400, "the file is empty", param="file")

    def pieces() -> Iterator[bytes]:
        # The upload is spooled to disk by Starlette; read it piece by piece.
        while piece := file.file.read(READ_BYTES):
            yield piece

    try:
        record = await run_in_threadpool(
            files_store.create_file,
            db,
            filename=file.filename or "upload",
            purpose=purpose,
            chunks=pieces(),
            max_bytes=settings.max_file_bytes,
        )
    except files_store.FileTooLarge as exc:
        raise APIError(413, str(exc), code="file_too_large", param="file") from None
    if record.bytes == 0:
        await run_in_threadpool(files_store.delete_file, db, file_id=record.id)
        raise APIError(400, "the file is empty", param="file")
    return files_store.file_object(record)


@router.get("/v1/files")
async def list_files(
    db: DbDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    records, more = await run_in_threadpool(
        files_store.list_files, db, purpose=purpose, after=after, limit=limit, order=order
    )
    data = [files_store.file_object(r) for r in records]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, db: DbDep) -> dict[str, Any]:
    record = await run_in_threadpool(files_store.get_file, db, file_id=file_id)
    if record is None:
        raise _missing(file_id)
    return files_store.file_object(record)


@router.get("/v1/files/{file_id}/content", response_model=None)
async def file_content(file_id: str, db: DbDep) -> StreamingResponse:
    record = await run_in_threadpool(files_store.get_file, db, file_id=file_id)
    if record is None:
        raise _missing(file_id)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in iterate_in_threadpool(files_store.iter_content(db, file_id=file_id)):
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(record.bytes)},
    )


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, db: DbDep) -> dict[str, Any]:
    if not await run_in_threadpool(files_store.delete_file, db, file_id=file_id):
        raise _missing(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
