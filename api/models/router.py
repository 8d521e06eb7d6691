from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.accounts.principal import PrincipalDep
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
async def list_models(catalog: CatalogDep, principal: PrincipalDep) -> dict[str, Any]:
    """The models there are, limited to those the caller's key may use."""
    live = {w.model for w in await catalog.live_workers()}
    names = [n for n in await catalog.names() if principal.may_use(n)]
    return {"object": "list", "data": [_model(n, live) for n in names]}


@router.get("/v1/models/{model_id:path}")
@router.get("/models/{model_id:path}", include_in_schema=False)
async def get_model(model_id: str, catalog: CatalogDep, principal: PrincipalDep) -> dict[str, Any]:
    """One model by its exact id (no single-model routing: a client asking
    about a model must learn whether that very model exists). A model the
    key may not use does not exist for it."""
    if model_id not in await catalog.names() or not principal.may_use(model_id):
        raise APIError(
            404, f"The model '{model_id}' does not exist", code="model_not_found", param="model"
        )
    live = {w.model for w in await catalog.live_workers()}
    return _model(model_id, live)
