"""Which models exist: the API's own models directory plus every model a live
worker announces (a cluster's API may have no models directory at all)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import redis.asyncio as aioredis

from api.errors import APIError
from schemas import keys
from schemas.registry import ModelConfig, Registry

_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class LiveWorker:
    model: str
    worker_id: str
    slots: int


class Catalog:
    def __init__(self, registry: Registry, client: aioredis.Redis) -> None:
        self.registry = registry
        self._client = client
        self._cached_at = 0.0
        self._workers: list[LiveWorker] = []

    async def live_workers(self) -> list[LiveWorker]:
        now = time.time()
        if now - self._cached_at < _CACHE_SECONDS:
            return self._workers
        raw = await self._client.hgetall(keys.WORKERS)
        workers = []
        for value in raw.values():
            try:
                info = json.loads(value)
            except ValueError:
                continue
            if info.get("expires_at", 0) > now:
                workers.append(LiveWorker(info["model"], info["worker_id"], info.get("slots", 1)))
        self._workers, self._cached_at = workers, now
        return workers

    async def names(self) -> list[str]:
        live = {w.model for w in await self.live_workers()}
        return sorted(set(self.registry.models) | live)

    async def require(self, name: str | None, *, authorization: str | None = None) -> str:
        """The model a request names, or the OpenAI 400/404. As LocalAI does, a
        request without a model may name one as its bearer token."""
        names = await self.names()
        if name is None and authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            if token in names:
                name = token
        return pick_model(name, names)


def pick_model(name: str | None, names: Collection[str]) -> str:
    """The model serving `name` among `names` (with exactly one model, any
    name), or the OpenAI 400/404."""
    if name is not None and name in names:
        return name
    if len(names) == 1:
        return next(iter(names))
    if name is None:
        raise APIError(400, "you must provide a model parameter", param="model")
    raise APIError(404, f"The model '{name}' does not exist", code="model_not_found", param="model")


# What a model's config must enable for each feature, and the setting to name.
_FEATURES: dict[str, tuple[str | None, Callable[[ModelConfig], bool]]] = {
    "text generation": (None, lambda c: c.generates),
    "embeddings": ("embeddings", lambda c: c.embeddings),
    "rerank": ("reranking", lambda c: c.reranking),
}


def require_feature(config: ModelConfig | None, model: str, feature: str) -> None:
    """A 400 `unsupported_model` unless the model serves `feature`. A model
    known only from a live worker (no config here) is let through: its worker
    answers for itself."""
    setting, enabled = _FEATURES[feature]
    if config is None or enabled(config):
        return
    hint = f" (its config would need `{setting}: true`)" if setting else ""
    raise APIError(
        400,
        f"model '{model}' does not serve {feature}{hint}",
        code="unsupported_model",
        param="model",
    )
