"""/v1/admin/keys: API keys over HTTP, for admin keys (and for the single
user while auth is off, whose first key turns auth on). The same operations
as `inferq keys`."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.accounts import store
from api.accounts.principal import AdminDep, KeyInfo
from api.accounts.protocol import KeyCreate, KeyDeleted, KeyList, KeyObject, KeyUpdate
from api.deps import DbDep, RedisDep
from api.errors import APIError
from api.routing import StrictJSONRoute
from schemas import keys
from schemas.tables import plausible_id

router = APIRouter(tags=["admin"], route_class=StrictJSONRoute)


def _missing(key_id: str) -> APIError:
    return APIError(404, f"No such API key: {key_id}", code="key_not_found", param="id")


async def _announce(redis: RedisDep) -> None:
    # This process reloads before its next request (the version moved), and
    # so does every other replica.
    await redis.incr(keys.API_KEYS_VERSION)


@router.post("/v1/admin/keys", response_model=KeyObject, status_code=201)
async def create_key(body: KeyCreate, _: AdminDep, db: DbDep, redis: RedisDep) -> KeyObject:
    try:
        expires_in = store.parse_duration(body.expires_in) if body.expires_in else None
    except ValueError as exc:
        raise APIError(400, f"expires_in: {exc}", param="expires_in") from None
    limits = store.Limits(
        rpm=body.rpm,
        tpm=body.tpm,
        batch_tokens=body.batch_tokens,
        models=body.models,
        quotas=body.quotas,
    )
    info, token = await run_in_threadpool(
        store.create_key, db, name=body.name, admin=body.admin, limits=limits, expires_in=expires_in
    )
    await _announce(redis)
    return KeyObject.of(info, token)


@router.get("/v1/admin/keys", response_model=KeyList)
async def list_keys(_: AdminDep, db: DbDep) -> KeyList:
    found = await run_in_threadpool(store.list_keys, db)
    return KeyList(data=[KeyObject.of(k) for k in found])


async def _get(db: DbDep, key_id: str) -> KeyInfo:
    info = None
    if plausible_id(key_id):
        info = await run_in_threadpool(store.get_key, db, key_id=key_id)
    if info is None:
        raise _missing(key_id)
    return info


@router.get("/v1/admin/keys/{key_id}", response_model=KeyObject)
async def retrieve_key(key_id: str, _: AdminDep, db: DbDep) -> KeyObject:
    return KeyObject.of(await _get(db, key_id))


@router.post("/v1/admin/keys/{key_id}", response_model=KeyObject)
async def update_key(
    key_id: str, body: KeyUpdate, _: AdminDep, db: DbDep, redis: RedisDep
) -> KeyObject:
    await _get(db, key_id)
    changes = body.model_dump(exclude_unset=True)
    info = await run_in_threadpool(store.update_key, db, key_id=key_id, changes=changes)
    if info is None:
        raise _missing(key_id)
    await _announce(redis)
    return KeyObject.of(info)


@router.post("/v1/admin/keys/{key_id}/rotate", response_model=KeyObject)
async def rotate_key(key_id: str, _: AdminDep, db: DbDep, redis: RedisDep) -> KeyObject:
    await _get(db, key_id)
    rotated = await run_in_threadpool(store.rotate_key, db, key_id=key_id)
    if rotated is None:
        raise APIError(400, f"API key {key_id} is revoked", param="id")
    await _announce(redis)
    return KeyObject.of(*rotated)


@router.delete("/v1/admin/keys/{key_id}", response_model=KeyDeleted)
async def revoke_key(key_id: str, _: AdminDep, db: DbDep, redis: RedisDep) -> KeyDeleted:
    """Revoke: the key stops working at once; its row stays, so what it owns
    and its usage keep their owner."""
    await _get(db, key_id)
    await run_in_threadpool(store.revoke_key, db, key_id=key_id)
    await _announce(redis)
    return KeyDeleted(id=key_id)
