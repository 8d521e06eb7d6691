"""create_app(): the FastAPI application and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api import errors, openapi
from api.batches.scheduler import BatchScheduler
from api.catalog import Catalog
from api.hub import StreamHub
from api.middleware import AssumeJSONBody
from api.routers import (
    batches,
    embeddings,
    files,
    generation,
    health,
    llama_props,
    llama_server,
    models,
    vgenerate,
)
from api.vocab import VocabCache
from schemas.db import make_engine
from schemas.queue import make_celery
from schemas.registry import load_registry
from schemas.settings import Settings, get_settings

log = logging.getLogger("inferq.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(settings.redis_url)
        hub = StreamHub(client)
        await hub.start()
        registry = load_registry(settings.models_dir)
        celery = make_celery(settings, name="inferq-api")
        app.state.settings = settings
        app.state.redis = client
        app.state.hub = hub
        app.state.catalog = Catalog(registry, client)
        app.state.celery = celery
        app.state.db = make_engine(settings.database_url)
        scheduler = None
        if settings.batch_scheduler:
            scheduler = BatchScheduler(
                settings,
                app.state.db,
                registry,
                redis.Redis.from_url(settings.redis_url),
                celery,
            )
            scheduler.start()
        app.state.scheduler = scheduler
        # Model vocabularies for /tokenize and /detokenize, loaded on first use.
        app.state.vocabs = VocabCache(settings.models_dir)
        log.info("API ready; models in %s: %s", settings.models_dir, ", ".join(registry.models))
        try:
            yield
        finally:
            if scheduler is not None:
                await run_in_threadpool(scheduler.stop)
            await hub.close()
            await client.aclose()
            celery.close()
            app.state.db.dispose()

    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    openapi.install(app)
    app.add_middleware(AssumeJSONBody)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(generation.router)
    app.include_router(embeddings.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(vgenerate.router)
    app.include_router(llama_server.router)
    app.include_router(llama_props.router)
    return app
