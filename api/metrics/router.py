"""GET /metrics: Prometheus text exposition. An admin key when auth is on."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import REGISTRY, generate_latest
from redis.exceptions import RedisError

from api.accounts.principal import AdminDep
from api.metrics.collector import FleetCollector, Scrape, gather

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

# The classic text format (what llama-server answers with); prometheus_client
# writes it for these names whatever its own default content type is.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, _: AdminDep) -> PlainTextResponse:
    """llama.cpp's server metrics (`llamacpp:*`) summed over each model's live
    workers, inferq's own (`inferq_*`: queues, workers, latency, requests,
    batch lines, rate-limit refusals) and this process's (`process_*`)."""
    state = request.app.state
    try:
        scrape = await gather(state.redis, state.catalog.registry.models)
    except (RedisError, OSError) as exc:
        # Still answer with this process's own figures (inferq_redis_up 0).
        log.warning("metrics: Redis unreachable: %s", exc)
        scrape = Scrape(redis_up=False)
    body = generate_latest(REGISTRY) + generate_latest(FleetCollector(scrape))
    return PlainTextResponse(body, media_type=CONTENT_TYPE)
