"""Annotated dependencies the routers declare."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import Engine

from api.accounts.principal import PrincipalDep
from api.catalog import Catalog
from api.streaming.hub import StreamHub
from api.streaming.jobs import JobRunner
from schemas.settings import Settings


def _state(name: str) -> Callable[[Request], Any]:
    """What the lifespan keeps in `app.state` under `name` (api/main.py)."""

    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_state("settings"))]
RedisDep = Annotated[aioredis.Redis, Depends(_state("redis"))]
HubDep = Annotated[StreamHub, Depends(_state("hub"))]
CatalogDep = Annotated[Catalog, Depends(_state("catalog"))]
CeleryDep = Annotated[Celery, Depends(_state("celery"))]
# A synchronous SQLAlchemy engine: call it through run_in_threadpool.
DbDep = Annotated[Engine, Depends(_state("db"))]


def _runner(
    settings: SettingsDep,
    redis: RedisDep,
    hub: HubDep,
    celery: CeleryDep,
    principal: PrincipalDep,
    request: Request,
) -> JobRunner:
    return JobRunner(settings, redis, hub, celery, principal, request.state)


RunnerDep = Annotated[JobRunner, Depends(_runner)]
