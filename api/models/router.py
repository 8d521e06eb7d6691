from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.deps import CatalogDep
from api.errors import APIError
from api.routing import StrictJSONRoute

router = APIRouter(tags=["models"], route_class=StrictJSONRoute)
_STARTED = int(time.time())


def _model(name: str, live: set[str]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": _STARTED,
        "owned_by": "inferq",
        "ready": name in live,
    }


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(catalog: CatalogDep) -> dict[str, Any]:
    live = {w.model for w in await catalog.live_workers()}
    return {"object": "list", "data": [_model(n, live) for n in await catalog.names()]}


@router.get("/v1/models/{model_id:path}")
@router.get("/models/{model_id:path}", include_in_schema=False)
async def get_model(model_id: str, catalog: CatalogDep) -> dict[str, Any]:
    """One model by its exact id (no single-model routing: a client asking
    about a model must learn whether that very model exists)."""
    if model_id not in await catalog.names():
        raise APIError(
            404, f"The model '{model_id}' does not exist", code="model_not_found", param="model"
        )
    live = {w.model for w in await catalog.live_workers()}
    return _model(model_id, live)
