"""What every inferq deployment under test is built of: a models directory
with the tiny model, a Postgres database of its own, the environment its
processes read, and the usage and batch-line rows it writes.

The session-wide stack (tests.support.stack), the private fleets a test may
break (tests.support.fleet) and the fuzzers' stack all start from these, so a
setting or a model file is declared here once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support.procs import base_env, inferq

MODEL = "tiny"

# Bulk work on a short leash, so a lost line comes back within seconds: a
# scheduler pass every 0.2 s, 3 s leases renewed every 0.5 s, 4-line chunks.
FAST_BATCHES: Mapping[str, str] = {
    "INFERQ_BATCH_TICK": "0.2",
    "INFERQ_BATCH_LEASE": "3",
    "INFERQ_HEARTBEAT_INTERVAL": "0.5",
    "INFERQ_BATCH_CHUNK_LINES": "4",
}


def model_dir(
    root: Path,
    gguf: Path,
    *,
    context: int,
    parallel: int,
    bulk_parallel: int | None = None,
    name: str = MODEL,
    unserved: bool = False,
) -> Path:
    """`root/models` with the tiny llama as `name` (`bulk_parallel` sequences
    for batch lines, else the default); with `unserved`, also a model
    `other` that no worker will ever serve."""
    models = root / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(gguf.read_bytes())
    (models / "tiny.yaml").write_text(
        f"name: {name}\nparameters:\n  model: tiny.gguf\ncontext_size: {context}\n"
        f"parallel: {parallel}\nthreads: 1\n"
        + ("" if bulk_parallel is None else f"bulk_parallel: {bulk_parallel}\n")
    )
    if unserved:
        (models / "other.yaml").write_text("name: other\nparameters:\n  model: tiny.gguf\n")
    return models


@contextmanager
def scratch_database(pg_server_url: str, prefix: str) -> Iterator[str]:
    """A fresh, empty database on the server, dropped (connections and all)
    when the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def other_redis_db(redis_url: str, offset: int) -> str:
    """The URL of database (index + `offset`) of the same Redis, flushed:
    queues there are invisible to workers on `redis_url` (pub/sub is shared)."""
    client = redis.Redis.from_url(redis_url)
    db = (int(client.connection_pool.connection_kwargs.get("db", 0)) + offset) % 16
    client.close()
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def stack_env(
    redis_url: str, database_url: str, models: Path, port: int | None, **settings: str
) -> dict[str, str]:
    """The environment of every process of one deployment."""
    extra = {"INFERQ_PORT": str(port)} if port is not None else {}
    return base_env(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        INFERQ_MODELS_DIR=str(models),
        **extra,
        **settings,
    )


def migrate(env: dict[str, str], log: Path) -> None:
    assert inferq(["migrate"], env, log).wait(60) == 0, log.read_text()


def poll_usage(
    *,
    database_url: str,
    where: str = "TRUE",
    params: Mapping[str, Any] | None = None,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 10,
    interval: float = 0.1,
) -> list[dict[str, Any]]:
    """Usage rows matching `where` (in id order), once `until` holds for them
    or `timeout` has passed: a worker writes its row just after the answer."""
    engine = create_engine(database_url)
    query = text(f"SELECT * FROM usage WHERE {where} ORDER BY id")
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                found = [dict(row) for row in conn.execute(query, dict(params or {})).mappings()]
            if until(found) or time.monotonic() > deadline:
                return found
            time.sleep(interval)
    finally:
        engine.dispose()


def wait_lines_running(*, database_url: str, timeout: float = 30) -> None:
    """Until some worker holds batch lines. No pause between looks: the tiny
    model finishes a chunk in a blink, and a strike must catch one running."""
    engine = create_engine(database_url)
    query = text("SELECT count(*) FROM batch_lines WHERE state = 'running'")
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                if conn.execute(query).scalar_one():
                    return
            assert time.monotonic() < deadline, "the worker never held a line"
    finally:
        engine.dispose()


def max_attempts(*, database_url: str) -> int:
    """The most times any batch line was handed to a worker."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT max(attempts) FROM batch_lines")).scalar_one())
    finally:
        engine.dispose()
