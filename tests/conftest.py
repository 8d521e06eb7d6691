"""Session fixtures: real Redis and Postgres (from REDIS_URL / DATABASE_URL,
or throwaway servers), and the tiny models the suite writes itself.

The suite flushes the Redis database it is given (the index in REDIS_URL)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from inferq.migrate import upgrade
from schemas.db import make_engine
from schemas.settings import normalize_database_url
from tests.support.deploy import other_redis_db, scratch_database
from tests.support.postgres_server import start_postgres
from tests.support.redis_server import start_redis
from tests.support.stack import Stack, stack
from tests.support.tinymodel import write_tiny_llama
from tests.support.vllm_stack import hf_models, vllm_stack

logging.getLogger("gguf").setLevel(logging.WARNING)

__all__ = ["hf_models", "stack", "vllm_stack"]

# The engines a `served` test runs on: the same requests, through the same
# API, answered by a llama.cpp worker and by a vLLM worker.
BACKENDS = ("llama-cpp", "vllm")


@pytest.fixture(scope="session", params=BACKENDS)
def served(request: pytest.FixtureRequest) -> Stack:
    """The end-to-end stack of each backend in turn (MODEL on each)."""
    fixture = "vllm_stack" if request.param == "vllm" else "stack"
    served_stack: Stack = request.getfixturevalue(fixture)
    return served_stack


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def other_redis_url(redis_url: str) -> str:
    """Another database of the same Redis: queues there are invisible to the
    workers the session-wide stack runs (pub/sub is shared, request ids are not)."""
    return other_redis_db(redis_url, 1)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        url = normalize_database_url(url)
        if make_url(url).get_backend_name() != "postgresql":
            raise RuntimeError("DATABASE_URL must point at Postgres for the test suite")
        yield url
        return
    server = start_postgres()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    with scratch_database(pg_server_url, "inferq_test") as url:
        yield url


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """An engine on a fresh Postgres database migrated to the head."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("weights") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_fim_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with fill-in-the-middle tokens (llama-server's /infill)."""
    return write_tiny_llama(tmp_path_factory.mktemp("weights-fim") / "tiny-fim.gguf", fim=True)
