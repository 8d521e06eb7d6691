"""Redis clients with bounded waits, for the API (asyncio) and the workers.

redis-py's defaults retry a failed command ten times with backoff, each try
with a 5 s socket timeout: with Redis down a request would hang for most of a
minute. inferq's clients give up after one `redis_timeout` (or two quick
retries of a refused connection), so a request answers 503 within seconds,
and reconnect by themselves on the next call once Redis is back."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from schemas.settings import Settings

# A refused or dropped connection is retried (a restarted Redis, a stale
# pooled connection); a timeout is not: it already took `redis_timeout`.
_RETRIES = 2
_RETRY_ON = (RedisConnectionError,)
# Seconds between pings on idle connections, so a dead one is noticed and
# replaced before a request trips over it.
_HEALTH_CHECK = 5


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=0.5)


def _options(settings: Settings) -> dict[str, Any]:
    """What both clients share: bounded waits and the health check."""
    return {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        "health_check_interval": _HEALTH_CHECK,
    }


def sync_client(settings: Settings) -> redis.Redis:
    retry = Retry(_backoff(), _RETRIES, supported_errors=_RETRY_ON)
    return redis.Redis.from_url(settings.redis_url, retry=retry, **_options(settings))


def async_client(settings: Settings) -> aioredis.Redis:
    retry = AsyncRetry(_backoff(), _RETRIES, supported_errors=_RETRY_ON)
    return aioredis.Redis.from_url(settings.redis_url, retry=retry, **_options(settings))
