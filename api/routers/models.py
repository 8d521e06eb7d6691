from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.deps import CatalogDep

router = APIRouter(tags=["models"])
_STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(catalog: CatalogDep) -> dict[str, Any]:
    live = {w.model for w in await catalog.live_workers()}
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": _STARTED,
                "owned_by": "inferq",
                "ready": name in live,
            }
            for name in await catalog.names()
        ],
    }
