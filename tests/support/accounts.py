"""A deployment with API keys: keys turn auth on for everything that shares
their database and Redis, so tests of accounts never use the session stack.
`accounts` is one such fleet per test module (API with the batch scheduler,
one worker of the tiny model); `new_key` makes a key the way the CLI does."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from api.accounts.store import Limits, announce, create_key
from schemas.accounts import QuotaRule
from schemas.db import make_engine
from tests.support.deploy import FAST_BATCHES, scratch_database
from tests.support.fleet import Fleet, fleet_on
from tests.support.procs import wait_status

__all__ = ["accounts", "as_key", "http_as", "new_key", "openai_as"]


@pytest.fixture(scope="module")
def accounts(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, pg_server_url: str
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("accounts")
    with (
        scratch_database(pg_server_url, "inferq_accounts") as database_url,
        fleet_on(
            root,
            tiny_gguf,
            database_url=database_url,
            context=2048,
            parallel=4,
            unserved=True,
            settings={**FAST_BATCHES, "INFERQ_REQUEST_TIMEOUT": "60"},
        ) as stack,
    ):
        stack.start_api(wait=False)
        stack.start_worker("worker", wait=False)
        wait_status(stack.url + "/health", 200, 60, stack.log)
        yield stack


def new_key(
    fleet: Fleet,
    name: str = "test",
    *,
    admin: bool = False,
    rpm: int | None = None,
    tpm: int | None = None,
    batch_tokens: int | None = None,
    models: Sequence[str] | None = None,
    quotas: Sequence[QuotaRule] = (),
    expires_in: timedelta | None = None,
) -> str:
    """A new key of `fleet` (its token), announced to its API processes."""
    engine = make_engine(fleet.database_url)
    try:
        _, token = create_key(
            engine,
            name=name,
            admin=admin,
            limits=Limits(
                rpm=rpm, tpm=tpm, batch_tokens=batch_tokens, models=models, quotas=quotas
            ),
            expires_in=expires_in,
        )
    finally:
        engine.dispose()
    client = redis.Redis.from_url(fleet.env["REDIS_URL"])
    try:
        announce(client)
    finally:
        client.close()
    return token


def as_key(token: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}


def openai_as(fleet: Fleet, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=token, max_retries=0)


def http_as(fleet: Fleet, token: str) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, headers=as_key(token), timeout=60)
