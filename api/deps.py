"""Annotated dependencies the routers declare."""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import Engine

from api.catalog import Catalog
from api.streaming.hub import StreamHub
from api.streaming.jobs import JobRunner
from schemas.settings import Settings


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _redis(request: Request) -> aioredis.Redis:
    client: aioredis.Redis = request.app.state.redis
    return client


def _hub(request: Request) -> StreamHub:
    hub: StreamHub = request.app.state.hub
    return hub


def _catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def _celery(request: Request) -> Celery:
    app: Celery = request.app.state.celery
    return app


def _db(request: Request) -> Engine:
    engine: Engine = request.app.state.db
    return engine


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[aioredis.Redis, Depends(_redis)]
HubDep = Annotated[StreamHub, Depends(_hub)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
CeleryDep = Annotated[Celery, Depends(_celery)]
# A synchronous SQLAlchemy engine: call it through run_in_threadpool.
DbDep = Annotated[Engine, Depends(_db)]


def _runner(settings: SettingsDep, redis: RedisDep, hub: HubDep, celery: CeleryDep) -> JobRunner:
    return JobRunner(settings, redis, hub, celery)


RunnerDep = Annotated[JobRunner, Depends(_runner)]
