"""/v1/files: OpenAI's Files API (uploads for bulk jobs, and their results).
The bytes live in the database (api/files/store.py); these routes only move
them, a piece at a time, between the client and the thread pool."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from api.accounts.principal import PrincipalDep
from api.deps import DbDep, SettingsDep
from api.errors import APIError
from api.files import store as files_store
from api.files.protocol import UPLOAD_PURPOSES, FileDeleted, FileList, FileObject
from api.routing import StrictJSONRoute
from schemas.settings import Settings
from schemas.tables import FileRecord

log = logging.getLogger(__name__)

READ_BYTES = 1024 * 1024
# Room for the multipart framing and the other fields around the file's own
# bytes when judging a request by its Content-Length (Starlette caps a text
# field at 1 MiB, so nothing legitimate needs more).
MULTIPART_SLACK = 1024 * 1024


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the file is larger than the {limit}-byte limit", code="file_too_large", param="file"
    )


class _UploadRoute(StrictJSONRoute):
    """FastAPI parses a form (Starlette spools the file to disk) before any
    dependency or the endpoint runs, so an upload that declares a length far
    past the limit is refused here, before its bytes are read. Uploads sent
    without a Content-Length are still caught while they are stored."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            if request.method == "POST":
                settings: Settings = request.app.state.settings
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > settings.max_file_bytes + MULTIPART_SLACK:
                    raise _too_large(settings.max_file_bytes)
            return await handler(request)

        return guarded


router = APIRouter(tags=["files"], route_class=_UploadRoute)


def _missing(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", code="file_not_found", param="id")


def _object(record: FileRecord) -> FileObject:
    return FileObject.model_validate(files_store.file_object(record))


@router.post("/v1/files", response_model=FileObject)
async def upload_file(
    db: DbDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(
            400,
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)} (got '{purpose}')",
            param="purpose",
        )
    if file.size == 0:
        raise APIError(400, "the file is empty", param="file")

    def pieces() -> Iterator[bytes]:
        # Runs in the thread pool with create_file: the spooled upload is
        # read a piece at a time, never whole.
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
            owner=principal.key_id,
        )
    except files_store.FileTooLarge:
        raise _too_large(settings.max_file_bytes) from None
    if record.bytes == 0:
        # The size was unknown up front (no per-part length); drop the row.
        await run_in_threadpool(files_store.delete_file, db, file_id=record.id)
        raise APIError(400, "the file is empty", param="file")
    log.info("file %s stored (%s, %d bytes, %s)", record.id, record.filename, record.bytes, purpose)
    return _object(record)


@router.get("/v1/files", response_model=FileList)
async def list_files(
    db: DbDep,
    principal: PrincipalDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    records, more = await run_in_threadpool(
        files_store.list_files,
        db,
        purpose=purpose,
        after=after,
        limit=limit,
        order=order,
        owner_filter=principal.owner_filter,
    )
    data = [_object(r) for r in records]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=more,
    )


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, db: DbDep, principal: PrincipalDep) -> FileObject:
    record = await run_in_threadpool(
        files_store.get_file, db, file_id=file_id, owner_filter=principal.owner_filter
    )
    if record is None:
        raise _missing(file_id)
    return _object(record)


@router.get(
    "/v1/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The bytes"}},
)
async def file_content(file_id: str, db: DbDep, principal: PrincipalDep) -> StreamingResponse:
    record = await run_in_threadpool(
        files_store.get_file, db, file_id=file_id, owner_filter=principal.owner_filter
    )
    if record is None:
        raise _missing(file_id)

    async def body() -> AsyncIterator[bytes]:
        # One chunk query per step, each in the thread pool.
        async for chunk in iterate_in_threadpool(files_store.iter_content(db, file_id=file_id)):
            yield chunk

    # Content-Length lets clients show progress; a file deleted mid-download
    # then ends short, which the client reports instead of keeping a torn file.
    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(record.bytes)},
    )


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, db: DbDep, principal: PrincipalDep) -> FileDeleted:
    deleted = await run_in_threadpool(
        files_store.delete_file, db, file_id=file_id, owner_filter=principal.owner_filter
    )
    if not deleted:
        raise _missing(file_id)
    log.info("file %s deleted", file_id)
    return FileDeleted(id=file_id, deleted=True)
