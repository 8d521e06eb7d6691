"""What the llama.cpp endpoints share: the properties a model's workers
publish, the refusal of llama.cpp-only endpoints for vLLM models, and the
defaults of /completion and /infill that POST /props stores in Redis (the
default model of llama-server's routes: Catalog.named_or_default)."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from api.errors import APIError
from schemas import keys
from schemas.registry import ModelConfig


async def published_props(client: aioredis.Redis, model: str, *, why: str) -> bytes:
    """The properties `model`'s workers publish when they start (the API may
    have no copy of the model); a 503 before any has, that ends with `why`."""
    raw = await client.get(keys.model_props(model))
    if raw is None:
        raise APIError(
            503,
            f"no worker of model '{model}' has started yet: {why}",
            code="no_worker_ready",
        )
    return raw.encode() if isinstance(raw, str) else bytes(raw)


def require_llama_cpp(config: ModelConfig | None, model: str, endpoint: str, instead: str) -> None:
    """A 400 `unsupported_model` when `model` runs on vLLM, which has none of
    llama.cpp's `endpoint`; `instead` names the route to use. A model known
    only from a live worker (no config here) is let through: its worker
    refuses what it cannot run."""
    if config is None or config.backend != "vllm":
        return
    raise APIError(
        400,
        f"model '{model}' runs on vLLM, which has no llama.cpp {endpoint} endpoint: "
        f"use {instead} instead",
        code="unsupported_model",
        param="model",
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
