"""create_app(): the FastAPI application and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from api import errors, openapi
from api.accounts import router as admin_keys
from api.accounts.auth import Authenticate, KeyCache
from api.batches import router as batches
from api.batches.scheduler import BatchScheduler
from api.catalog import Catalog
from api.embeddings import router as embeddings
from api.files import router as files
from api.generate import router as vgenerate
from api.llama import apply_template
from api.llama import props as llama_props
from api.llama import router as llama_server
from api.metrics import router as metrics
from api.metrics.instruments import CountResponses
from api.middleware import AnswerPreflight, AssumeJSONBody, LimitBody, parse_origins
from api.models import health
from api.models import router as models
from api.openai import router as generation
from api.streaming.hub import StreamHub, install_redis_errors
from api.usage import router as usage
from api.vocab import VocabCache
from schemas.db import make_engine
from schemas.queue import make_celery
from schemas.redis_client import async_client, sync_client
from schemas.registry import load_registry
from schemas.settings import Settings, get_settings

log = logging.getLogger("inferq.api")


async def _say_auth_mode(cache: KeyCache) -> None:
    try:
        on = await cache.auth_on()
    except Exception as exc:
        log.warning("could not read the API keys yet: %s", exc)
        return
    if on:
        log.info("auth required: every route but /health needs an API key")
    else:
        log.warning(
            "auth is off: no API key exists, anyone who reaches this port may use it; "
            "`inferq keys create --name NAME --admin` turns it on"
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Bounded Redis waits: with Redis down a request is a 503 in seconds.
        client = async_client(settings)
        hub = StreamHub(client, settings)
        await hub.start()
        registry = load_registry(settings.models_dir)
        celery = make_celery(settings, name="inferq-api")
        app.state.settings = settings
        app.state.redis = client
        app.state.hub = hub
        app.state.catalog = Catalog(registry, client, default_model=settings.default_model)
        app.state.celery = celery
        app.state.db = make_engine(settings.database_url)
        app.state.key_cache = KeyCache(app.state.db, client, settings)
        scheduler = None
        if settings.batch_scheduler:
            scheduler = BatchScheduler(
                settings,
                app.state.db,
                registry,
                sync_client(settings),
                celery,
            )
            scheduler.start()
        app.state.scheduler = scheduler
        # Model vocabularies for /tokenize and /detokenize, loaded on first use.
        app.state.vocabs = VocabCache(settings.models_dir)
        log.info("API ready; models in %s: %s", settings.models_dir, ", ".join(registry.models))
        await _say_auth_mode(app.state.key_cache)
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
    install_redis_errors(app)
    openapi.install(app)
    # Starlette runs the last added outermost: preflight, CORS, the
    # cross-site and content-type rules, then the body limit.
    origins = parse_origins(settings.cors_origins)
    # Innermost of the edge rules but before any route reads the body.
    app.add_middleware(Authenticate)
    app.add_middleware(LimitBody, limit=settings.max_body_bytes, exempt=("/v1/files",))
    app.add_middleware(AssumeJSONBody, allowed_origins=origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "Retry-After",
                "x-ratelimit-limit-requests",
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-requests",
                "x-ratelimit-reset-tokens",
            ],
        )
    app.add_middleware(AnswerPreflight, allowed_origins=origins)
    # Outermost: every response is counted by status class, refusals included.
    app.add_middleware(CountResponses)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(generation.router)
    app.include_router(embeddings.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(usage.router)
    app.include_router(vgenerate.router)
    app.include_router(llama_server.router)
    app.include_router(llama_props.router)
    app.include_router(apply_template.router)
    app.include_router(admin_keys.router)
    app.include_router(metrics.router)
    return app
