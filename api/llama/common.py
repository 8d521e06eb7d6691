"""What the llama.cpp endpoints share: the default model, and the defaults
POST /props stores in Redis."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from api import catalog as api_catalog
from api.catalog import GENERATION, Catalog
from schemas import keys


async def pick_model(catalog: Catalog, name: str | None, feature: str = GENERATION) -> str:
    """The model a llama.cpp request names, or the default: llama-server
    clients name none, so it is INFERQ_DEFAULT_MODEL, else the first model
    serving `feature` with a live worker, else the first configured. A name
    no model has reaches the only model serving `feature` (LocalAI's rule)."""
    if name is None:
        return await catalog.default(feature)
    names = await catalog.names()
    return api_catalog.pick_model(
        name, names, api_catalog.capable_models(catalog.registry, names, feature)
    )


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
