"""Authentication, before anything reads the body: an ASGI middleware that
turns the request's key into a Principal in `request.state`, or answers 401.

Keys live in the database and in each API process's memory. Every request
reads one Redis counter (schemas.keys.API_KEYS_VERSION) that key changes
bump, and a process whose copy is older reloads before it answers: a revoked
key is refused on the very next request, on every replica. A periodic reload
covers a change whose announcement did not reach Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.accounts.principal import OPEN, KeyInfo, Principal
from api.accounts.store import load_keys, matches, token_id
from api.errors import APIError, db_unavailable
from schemas import keys
from schemas.settings import Settings

log = logging.getLogger(__name__)

# Reload the keys at least this often even when no change was announced.
RELOAD_SECONDS = 5.0
# Routes that answer without a key: load balancers' health checks, and the
# API's own description (no data in it).
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class KeyCache:
    def __init__(self, db: Engine, client: aioredis.Redis, settings: Settings) -> None:
        self._db = db
        self._redis = client
        self.required = settings.auth == "required"
        self._keys: dict[str, KeyInfo] | None = None
        self._version: bytes | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def _reload(self, version: bytes | None) -> None:
        async with self._lock:
            if self._keys is not None and version == self._version and not self._old():
                return
            loaded = await run_in_threadpool(load_keys, self._db)
            self._keys, self._version, self._loaded_at = loaded, version, time.monotonic()

    def _old(self) -> bool:
        return time.monotonic() - self._loaded_at > RELOAD_SECONDS

    async def _refresh_quietly(self, version: bytes | None) -> None:
        try:
            await self._reload(version)
        except Exception as exc:
            log.warning("reloading API keys failed (the last ones stay in use): %s", exc)

    async def current(self) -> Mapping[str, KeyInfo]:
        try:
            raw = await self._redis.get(keys.API_KEYS_VERSION)
            version = raw if isinstance(raw, bytes) or raw is None else str(raw).encode()
        except (RedisError, OSError):
            # Redis away: no change can be announced either; keep what we have.
            version = self._version
        if self._keys is None or version != self._version:
            try:
                await self._reload(version)
            except Exception as exc:
                if self._keys is None:
                    raise db_unavailable(exc) from exc
                log.warning("reloading API keys failed (the last ones stay in use): %s", exc)
        elif self._old() and (self._background is None or self._background.done()):
            self._background = asyncio.create_task(self._refresh_quietly(version))
        assert self._keys is not None
        return self._keys

    async def auth_on(self) -> bool:
        return self.required or bool(await self.current())


def presented_token(scope: Scope) -> str | None:
    """The key in `Authorization: Bearer` or `x-api-key`."""
    bearer = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                bearer = text[7:].strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return bearer or api_key or None


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def authenticate(found: Mapping[str, KeyInfo], token: str | None) -> Principal:
    """The principal of `token`, or a 401. The token never reaches a log or a
    message."""
    if token is None:
        raise _unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`."
        )
    key_id = token_id(token)
    key = found.get(key_id) if key_id is not None else None
    if key is None or not matches(key, token):
        raise _unauthorized("Incorrect API key provided.")
    if key.revoked_at is not None:
        raise _unauthorized("This API key has been revoked.")
    if not key.usable(datetime.now(UTC)):
        raise _unauthorized("This API key has expired.")
    return Principal(key)


class Authenticate:
    """Puts the caller's Principal in the request state. Runs before the body
    is read, so an unauthenticated upload is refused before it is spooled."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        cache: KeyCache = scope["app"].state.key_cache
        state = scope.setdefault("state", {})
        try:
            found = await cache.current()
            if cache.required or found:
                principal = authenticate(found, presented_token(scope))
            else:
                principal = OPEN
        except APIError as exc:
            await exc.response()(scope, receive, send)
            return
        state["principal"] = principal
        if principal.key is None:
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            # Rate-limit headers a route's admission left (api/accounts/limits.py).
            if message["type"] == "http.response.start":
                extra = state.get("ratelimit_headers")
                if extra:
                    headers = list(message.get("headers", []))
                    headers.extend((k.encode(), v.encode()) for k, v in extra.items())
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_limits)
