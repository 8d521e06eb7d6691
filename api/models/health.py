from __future__ import annotations

from fastapi import APIRouter, Request
from redis.exceptions import RedisError

from api.deps import CatalogDep
from api.errors import APIError
from api.streaming.hub import StreamHub, redis_unavailable

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(catalog: CatalogDep, request: Request) -> dict[str, str]:
    """200 once a worker for at least one model is ready; 503 before, and
    while Redis (queue and event streams) is unreachable."""
    hub: StreamHub = request.app.state.hub
    if not hub.connected:
        raise redis_unavailable("the pub/sub connection is down")
    try:
        workers = await catalog.live_workers()
    except RedisError as exc:
        raise redis_unavailable(exc) from exc
    if not workers:
        raise APIError(503, "no model worker is ready yet", code="no_worker_ready")
    return {"status": "ok"}
