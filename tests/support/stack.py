"""The end-to-end stack: `inferq api` and `inferq worker` as separate
processes on real Redis and Postgres, with a real llama.cpp engine. One
session-wide stack serves tests/api and tests/reliability: the root conftest
registers the fixture once (two stacks would share one Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.support.procs import base_env, free_port, inferq, stop, wait_status

MODEL = "tiny"


@dataclass
class Stack:
    url: str
    database_url: str
    log: Path
    env: dict[str, str]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def usage(self, request_id: str, timeout: float = 10) -> dict[str, object]:
        engine = create_engine(self.database_url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with engine.connect() as conn:
                    row = (
                        conn.execute(
                            text("SELECT * FROM usage WHERE request_id = :r"), {"r": request_id}
                        )
                        .mappings()
                        .first()
                    )
                if row is not None:
                    return dict(row)
                if time.monotonic() > deadline:
                    raise AssertionError(f"no usage row for {request_id}")
                time.sleep(0.1)
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, redis_url: str, pg_server_url: str
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    models = root / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "tiny.yaml").write_text(
        "name: tiny\nparameters:\n  model: tiny.gguf\ncontext_size: 2048\nparallel: 2\nthreads: 1\n"
    )
    # A second model with no worker: unknown names must not route anywhere.
    (models / "other.yaml").write_text("name: other\nparameters:\n  model: tiny.gguf\n")
    database = f"inferq_e2e_{int(time.time() * 1000)}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    database_url = pg_server_url.rsplit("/", 1)[0] + "/" + database
    port = free_port()
    env = base_env(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        INFERQ_MODELS_DIR=str(models),
        INFERQ_PORT=str(port),
        INFERQ_REQUEST_TIMEOUT="60",
        # Bulk jobs move on every 0.2 s instead of every second.
        INFERQ_BATCH_TICK="0.2",
    )
    log = root / "stack.log"
    migrate = inferq(["migrate"], env, log)
    assert migrate.wait(60) == 0, log.read_text()
    api = inferq(["api"], env, log)
    worker = None
    try:
        url = f"http://127.0.0.1:{port}"
        # Up, but no worker yet: /health says 503 in the error envelope.
        wait_status(url + "/v1/models", 200, 30, log)
        response = httpx.get(url + "/health")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_worker_ready"
        worker = inferq(["worker", "--model", MODEL], env, log)
        wait_status(url + "/health", 200, 60, log)
        yield Stack(url, database_url, log, env)
    finally:
        stop(api)
        if worker is not None:
            stop(worker)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
