"""The end-to-end stack: `inferq api` and `inferq worker` as separate
processes on real Redis and Postgres, with a real llama.cpp engine. One
session-wide stack serves tests/api and tests/reliability: the root conftest
registers the fixture once (two stacks would share one Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.deploy import MODEL, migrate, model_dir, poll_usage, scratch_database, stack_env
from tests.support.procs import free_port, inferq, stop, wait_status

__all__ = ["MODEL", "Stack", "stack"]


@dataclass
class Stack:
    url: str
    database_url: str
    log: Path
    env: dict[str, str]
    # The Python its workers run in (None: this one; the vLLM environment's
    # for the vLLM stack).
    python: Path | None = None

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def usage(self, request_id: str, timeout: float = 10) -> dict[str, object]:
        rows = poll_usage(
            database_url=self.database_url,
            where="request_id = :r",
            params={"r": request_id},
            until=bool,
            timeout=timeout,
        )
        if not rows:
            raise AssertionError(f"no usage row for {request_id}")
        return rows[0]


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, redis_url: str, pg_server_url: str
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    # A second model with no worker: unknown names must not route anywhere.
    models = model_dir(root, tiny_gguf, context=2048, parallel=2, unserved=True)
    with scratch_database(pg_server_url, "inferq_e2e") as database_url:
        yield from _run(root, models, redis_url=redis_url, database_url=database_url)


def _run(root: Path, models: Path, *, redis_url: str, database_url: str) -> Iterator[Stack]:
    """The API and one worker, until the session ends."""
    port = free_port()
    # Bulk jobs move on every 0.2 s instead of every second.
    env = stack_env(
        redis_url, database_url, models, port, INFERQ_REQUEST_TIMEOUT="60", INFERQ_BATCH_TICK="0.2"
    )
    log = root / "stack.log"
    migrate(env, log)
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
