"""Which models exist: the API's own models directory plus every model a live
worker announces (a cluster's API may have no models directory at all)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from api.accounts.principal import current_principal
from api.errors import APIError
from schemas import keys
from schemas.heartbeats import read_beats
from schemas.registry import ModelConfig, Registry

_CACHE_SECONDS = 1.0
GENERATION = "text generation"


@dataclass(frozen=True)
class LiveWorker:
    model: str
    worker_id: str
    slots: int


class Catalog:
    def __init__(
        self, registry: Registry, client: aioredis.Redis, *, default_model: str | None = None
    ) -> None:
        self.registry = registry
        self._client = client
        self.default_model = default_model
        self._cached_at = 0.0
        self._workers: list[LiveWorker] = []

    async def live_workers(self) -> list[LiveWorker]:
        now = time.time()
        if now - self._cached_at < _CACHE_SECONDS:
            return self._workers
        raw = await self._client.hgetall(keys.WORKERS)
        workers = [
            LiveWorker(beat.model, beat.worker_id, beat.slots)
            for beat in read_beats(raw.values())
            if beat.alive(now)
        ]
        self._workers, self._cached_at = workers, now
        return workers

    async def names(self) -> list[str]:
        live = {w.model for w in await self.live_workers()}
        return sorted(set(self.registry.models) | live)

    async def require(
        self,
        name: str | None,
        *,
        feature: str,
        authorization: str | None = None,
        strict: bool = True,
    ) -> str:
        """The model a request names, or the OpenAI 400/404. As LocalAI does, a
        request without a model may name one as its bearer token, and a name
        no model has reaches the one model that serves `feature`, when there
        is exactly one; a model that exists but does not serve it is a 400
        `unsupported_model`."""
        names = await self.names()
        if name is None and authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            if token in names:
                name = token
        return route_model(name, self.registry, names, feature, strict=strict)

    async def for_request(self, request: Request, name: str | None, feature: str) -> str:
        """`require` for the model an HTTP request names (or, while auth is
        off, its bearer token), among the models its key may use."""
        principal = current_principal(request)
        authorization = request.headers.get("authorization") if principal.key is None else None
        model = await self.require(name, authorization=authorization, feature=feature, strict=False)
        # The key's models first: a model it may not use is a 404 even where
        # another key would learn that the model serves something else.
        principal.require_model(model)
        require_feature(self.registry.models.get(model), model, feature)
        return model

    async def named_or_default(self, name: str | None, feature: str = GENERATION) -> str:
        """The model of a llama-server route: llama-server clients name none,
        so it is `default`; a name no model has reaches the only model serving
        `feature` (LocalAI's rule). The model's worker answers for what it
        serves: llama-server has no `unsupported_model`."""
        if name is None:
            return await self.default(feature)
        return route_model(name, self.registry, await self.names(), feature, strict=False)

    async def default(self, feature: str) -> str:
        """The model of llama-server's model-less routes: INFERQ_DEFAULT_MODEL
        for text generation when set, else the first model serving `feature`
        that has a live worker, else the first one configured."""
        names = await self.names()
        if feature == GENERATION and self.default_model:
            # A default that names no model is a 404, not a queue nobody reads.
            return pick_model(self.default_model, names)
        capable = capable_models(self.registry, names, feature)
        live = {w.model for w in await self.live_workers()}
        for candidate in capable:
            if candidate in live:
                return candidate
        if capable:
            return capable[0]
        raise APIError(404, f"no model serves {feature}", code="model_not_found", param="model")


def capable_models(registry: Registry, names: Collection[str], feature: str) -> list[str]:
    """The models among `names` that serve `feature`, in order. A model known
    only from a live worker (no config here) counts as a text-generation model."""
    _, enabled = _FEATURES[feature]
    out = []
    for name in names:
        config = registry.models.get(name)
        if (config is None and feature == GENERATION) or (config is not None and enabled(config)):
            out.append(name)
    return out


def route_model(
    name: str | None,
    registry: Registry,
    live_models: Collection[str],
    feature: str,
    *,
    strict: bool = True,
) -> str:
    """The model `name` reaches on a route serving `feature`, or the 400/404:
    Catalog.require's rule, for callers without a catalog (batch validation)
    too. `strict`: a 400 when that model does not serve `feature`."""
    names = sorted(set(registry.models) | set(live_models))
    model = pick_model(name, names, capable_models(registry, names, feature))
    if strict:
        require_feature(registry.models.get(model), model, feature)
    return model


def pick_model(
    name: str | None, names: Collection[str], capable: Collection[str] | None = None
) -> str:
    """The model serving `name` among `names`, or the OpenAI 400/404. LocalAI's
    rule: a name no model has reaches the one model that can serve the route
    (`capable`, when given and exactly one), or the only model there is."""
    if name is not None and name in names:
        return name
    if capable is not None and len(capable) == 1:
        return next(iter(capable))
    if len(names) == 1:
        return next(iter(names))
    if name is None:
        raise APIError(400, "you must provide a model parameter", param="model")
    raise APIError(404, f"The model '{name}' does not exist", code="model_not_found", param="model")


# What a model's config must enable for each feature, and the setting to name.
_FEATURES: dict[str, tuple[str | None, Callable[[ModelConfig], bool]]] = {
    GENERATION: (None, lambda c: c.generates),
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
