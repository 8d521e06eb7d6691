"""/v1/batches: OpenAI's Batches API. The work happens in the batch scheduler
and the workers; these routes record requests and report state."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api.accounts import batch_quota
from api.accounts.principal import PrincipalDep
from api.batches import protocol, store
from api.deps import DbDep, RedisDep
from api.errors import APIError
from api.files import store as files_store
from api.routing import StrictJSONRoute
from schemas import batch_line_reads, keys
from schemas import batches as b

router = APIRouter(tags=["batches"], route_class=StrictJSONRoute)


def _wake(request: Request) -> None:
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is not None:
        scheduler.wake()


def _object(db: DbDep, batch_id: str, owner_filter: str | None) -> protocol.BatchObject:
    # Another key's batch is the same 404 as a missing one.
    record = store.get_batch(db, batch_id=batch_id, owner_filter=owner_filter)
    if record is None:
        raise APIError(404, f"No batch found with id '{batch_id}'", code="batch_not_found")
    counts = store.counts(db, batch_ids=[batch_id])[batch_id]
    return store.batch_object(record, counts, store.usage(db, batch_ids=[batch_id])[batch_id])


@router.post("/v1/batches", response_model=protocol.BatchObject)
async def create_batch(
    body: protocol.BatchCreate, request: Request, db: DbDep, principal: PrincipalDep
) -> protocol.BatchObject:
    # Another key's file is refused exactly like a missing one.
    file = await run_in_threadpool(
        files_store.get_file,
        db,
        file_id=body.input_file_id,
        owner_filter=principal.owner_filter,
    )
    if file is None:
        raise APIError(
            404,
            f"input file '{body.input_file_id}' does not exist",
            code="file_not_found",
            param="input_file_id",
        )
    if file.purpose != "batch":
        raise APIError(
            400,
            f"input file '{file.id}' has purpose '{file.purpose}'; a batch needs purpose 'batch'",
            code="invalid_file",
            param="input_file_id",
        )
    # Within the key's batch-token allowance (a 429 when it does not fit).
    record = await run_in_threadpool(batch_quota.create_batch, db, create=body, principal=principal)
    _wake(request)
    return store.batch_object(record, protocol.RequestCounts())


@router.get("/v1/batches/{batch_id}", response_model=protocol.BatchObject)
async def retrieve_batch(batch_id: str, db: DbDep, principal: PrincipalDep) -> protocol.BatchObject:
    return await run_in_threadpool(_object, db, batch_id, principal.owner_filter)


@router.get("/v1/batches", response_model=protocol.BatchList)
async def list_batches(
    db: DbDep,
    principal: PrincipalDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> protocol.BatchList:
    def page() -> protocol.BatchList:
        records, more = store.list_batches(
            db, after=after, limit=limit, owner_filter=principal.owner_filter
        )
        counts = store.counts(db, batch_ids=[r.id for r in records])
        used = store.usage(db, batch_ids=[r.id for r in records])
        data = [store.batch_object(r, counts[r.id], used[r.id]) for r in records]
        return protocol.BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    return await run_in_threadpool(page)


@router.post("/v1/batches/{batch_id}/cancel", response_model=protocol.BatchObject)
async def cancel_batch(
    batch_id: str, request: Request, db: DbDep, redis: RedisDep, principal: PrincipalDep
) -> protocol.BatchObject:
    current = await run_in_threadpool(_object, db, batch_id, principal.owner_filter)
    if current.status in (b.CANCELLING, b.BATCH_CANCELLED):
        return current
    moved = await run_in_threadpool(store.request_cancel, db, batch_id=batch_id)
    if not moved:
        raise APIError(
            409,
            f"batch '{batch_id}' is {current.status} and can no longer be cancelled",
            code="batch_not_cancellable",
        )
    # Workers drop the lines they hold that have not started.
    models = await run_in_threadpool(batch_line_reads.batch_models, db, batch_id=batch_id)
    for model in models:
        await redis.publish(keys.cancel_channel(model), keys.batch_cancel_message(batch_id))
    _wake(request)
    return await run_in_threadpool(_object, db, batch_id, principal.owner_filter)
