"""Which models exist: the API's own models directory plus every model a live
worker announces (a cluster's API may have no models directory at all)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from api.errors import APIError
from schemas import keys
from schemas.registry import Registry

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
        if name is None and authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            if token in await self.names():
                name = token
        resolved = await self.resolve(name)
        if resolved is None:
            if name is None:
                raise APIError(400, "you must provide a model parameter", param="model")
            raise APIError(
                404, f"The model '{name}' does not exist", code="model_not_found", param="model"
            )
        return resolved

    async def resolve(self, name: str | None) -> str | None:
        """The model serving `name`; with exactly one model, any name."""
        names = await self.names()
        if name is not None and name in names:
            return name
        if len(names) == 1:
            return names[0]
        return None
