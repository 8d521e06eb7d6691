from __future__ import annotations

from fastapi import APIRouter

from api.deps import CatalogDep
from api.errors import APIError

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(catalog: CatalogDep) -> dict[str, str]:
    """200 once a worker for at least one model is ready, 503 before."""
    if not await catalog.live_workers():
        raise APIError(503, "no model worker is ready yet", code="no_worker_ready")
    return {"status": "ok"}
