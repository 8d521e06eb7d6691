"""What the llama.cpp endpoints share: the default model, and the defaults
POST /props stores in Redis."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from api.catalog import Catalog
from api.errors import APIError
from schemas import keys


async def pick_model(catalog: Catalog, name: str | None) -> str:
    """The model a llama.cpp request names, or the default: llama-server
    clients name none, so it is the first model with a live worker, else the
    first model configured."""
    if name is not None:
        return await catalog.require(name)
    names = await catalog.names()
    live = {w.model for w in await catalog.live_workers()}
    for candidate in names:
        if candidate in live:
            return candidate
    if names:
        return names[0]
    raise APIError(404, "no model is configured", code="model_not_found", param="model")


async def load_overrides(client: aioredis.Redis, model: str) -> dict[str, Any]:
    """The /completion defaults set through POST /props (request field names)."""
    raw = await client.get(keys.props_overrides(model))
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def save_overrides(client: aioredis.Redis, model: str, overrides: dict[str, Any]) -> None:
    await client.set(keys.props_overrides(model), json.dumps(overrides))
