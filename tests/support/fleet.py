"""A private inferq deployment a test may break: its own redis-server (which it
may kill and start again on the same port), its own database, one `inferq api`
and any number of `inferq worker` processes of the tiny model, each of which
it may freeze, kill or restart."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.support.deploy import (
    FAST_BATCHES,
    MODEL,
    max_attempts,
    migrate,
    model_dir,
    poll_usage,
    scratch_database,
    stack_env,
    wait_lines_running,
)
from tests.support.procs import free_port, inferq, stop, wait_status
from tests.support.redis_server import start_redis
from tests.support.servers import Restartable

__all__ = [
    "LONG_STREAM",
    "MODEL",
    "Fleet",
    "batch_fleet",
    "durable",
    "fleet",
    "fleet_on",
    "long_chat_stream",
]

# Long enough that a stream is still generating when the test strikes.
CONTEXT = 4096
# A streamed chat that is still generating when the test strikes.
LONG_STREAM: dict[str, Any] = {
    "model": MODEL,
    "stream": True,
    "max_tokens": 4000,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "tell me everything"}],
}


@dataclass
class Fleet:
    url: str
    env: dict[str, str]
    log: Path
    redis_server: Restartable
    database_url: str
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- processes --------------------------------------------------------

    def start_api(self, *, wait: bool = True) -> subprocess.Popen[bytes]:
        self.api = inferq(["api"], self.env, self.log)
        if wait:
            wait_status(self.url + "/v1/models", 200, 30, self.log)
        return self.api

    def running_api(self) -> subprocess.Popen[bytes]:
        assert self.api is not None, "the API was never started"
        return self.api

    def kill_api(self) -> None:
        api = self.running_api()
        api.send_signal(signal.SIGKILL)
        api.wait(10)

    def start_worker(self, name: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """A worker of the tiny model; with `wait`, until its heartbeat is in."""
        proc = inferq(["worker", "--model", MODEL], self.env, self.log)
        self.workers[name] = proc
        if wait:
            self.wait_live(proc.pid)
        return proc

    def kill_worker(self, name: str) -> None:
        proc = self.workers[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def strike(self, name: str) -> float:
        """Freeze the worker at once (no further token, no heartbeat), then
        kill it; the time it went silent."""
        proc = self.workers[name]
        proc.send_signal(signal.SIGSTOP)
        silent = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return silent

    def stop_redis(self) -> None:
        self.redis_server.halt()

    def start_redis(self, *, wait: bool = True) -> None:
        """Redis again, empty, on its port; with `wait`, once it answers."""
        self.redis_server.start(wait=wait)

    # -- what Redis and Postgres say ----------------------------------------

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_server.server.port, socket_timeout=2)

    def live_workers(self) -> dict[int, str]:
        """pid -> worker id of the workers whose heartbeat is fresh."""
        now = time.time()
        live = {}
        for raw in self.redis().hgetall("inferq:workers").values():
            info = json.loads(raw)
            if info["expires_at"] > now:
                live[int(info["pid"])] = str(info["worker_id"])
        return live

    def wait_live(self, pid: int, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker_id = self.live_workers().get(pid)
            if worker_id is not None:
                return worker_id
            time.sleep(0.05)
        raise AssertionError(f"worker {pid} never beat\n{self.log.read_text()[-3000:]}")

    def wait_unacked(self, timeout: float = 20) -> None:
        """Until some worker holds a job (Celery's Redis transport keeps each
        message it delivered and nobody acknowledged yet in `unacked`)."""
        deadline = time.monotonic() + timeout
        while self.redis().hlen("unacked") == 0:
            assert time.monotonic() < deadline, "no worker took the job"
            time.sleep(0.01)

    def usage(self, like: str, *, at_least: int = 0, timeout: float = 10) -> list[dict[str, Any]]:
        """Usage rows whose request id is LIKE `like`, once there are `at_least`
        (a worker writes its row just after the answer went out)."""
        return poll_usage(
            database_url=self.database_url,
            where="request_id LIKE :r",
            params={"r": like},
            until=lambda rows: len(rows) >= at_least,
            timeout=timeout,
        )

    def wait_lines_running(self) -> None:
        wait_lines_running(database_url=self.database_url)

    def max_attempts(self) -> int:
        return max_attempts(database_url=self.database_url)

    # -- requests ------------------------------------------------------------

    def client(self, *, max_retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=max_retries)

    def chat(self, content: str = "hello", timeout: float = 60, **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=timeout)


@contextmanager
def long_chat_stream(url: str, **extra: Any) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
    """A long streamed chat (LONG_STREAM with `extra`): its response and its
    lines, read at the test's own pace."""
    with (
        httpx.Client(timeout=httpx.Timeout(30.0, read=15.0)) as client,
        client.stream(
            "POST", url + "/v1/chat/completions", json={**LONG_STREAM, **extra}
        ) as response,
    ):
        yield response, response.iter_lines()


@contextmanager
def fleet_on(
    root: Path,
    tiny_gguf: Path,
    *,
    database_url: str,
    context: int,
    parallel: int,
    bulk_parallel: int | None = None,
    unserved: bool = False,
    settings: Mapping[str, str],
) -> Iterator[Fleet]:
    """A migrated fleet on `database_url` with its own Redis and no process
    yet, `settings` in its environment; every process it started is killed
    when the block ends."""
    models = model_dir(
        root,
        tiny_gguf,
        context=context,
        parallel=parallel,
        bulk_parallel=bulk_parallel,
        unserved=unserved,
    )
    server = Restartable(start_redis())
    port = free_port()
    env = stack_env(server.server.url, database_url, models, port, **settings)
    stack = Fleet(f"http://127.0.0.1:{port}", env, root / "fleet.log", server, database_url)
    try:
        migrate(env, stack.log)
        yield stack
    finally:
        for proc in [stack.api, *stack.workers.values()]:
            if proc is not None:
                stop(proc, signal.SIGKILL)
        server.close()


@contextmanager
def fleet(root: Path, tiny_gguf: Path, pg_server_url: str, **settings: str) -> Iterator[Fleet]:
    """A fleet for interactive requests in a database of its own: a long
    context (a stream is still generating when the test strikes), a model
    `other` no worker serves, and no batch scheduler."""
    with (
        scratch_database(pg_server_url, "inferq_fleet") as database_url,
        fleet_on(
            root,
            tiny_gguf,
            database_url=database_url,
            context=CONTEXT,
            parallel=2,
            unserved=True,
            settings={
                "INFERQ_REQUEST_TIMEOUT": "60",
                "INFERQ_BATCH_SCHEDULER": "false",
                **settings,
            },
        ) as stack,
    ):
        yield stack


@contextmanager
def batch_fleet(
    root: Path, tiny_gguf: Path, *, database_url: str, **settings: str
) -> Iterator[Fleet]:
    """A fleet for bulk work on short leases (FAST_BATCHES), its API (as
    `api`) and one worker (as `worker`) up and healthy."""
    with fleet_on(
        root,
        tiny_gguf,
        database_url=database_url,
        context=512,
        parallel=4,
        # Four lines at a time: a batch lasts long enough for the tests that
        # strike while it runs (kill a worker, freeze a leader, drop Redis).
        bulk_parallel=4,
        settings={**FAST_BATCHES, **settings},
    ) as stack:
        stack.start_api(wait=False)
        stack.start_worker("worker", wait=False)
        wait_status(stack.url + "/health", 200, 60, stack.log)
        yield stack


@pytest.fixture
def durable(tmp_path: Path, tiny_gguf: Path, pg_server_url: str) -> Iterator[Fleet]:
    """A batch fleet in a database of its own, for tests that break it."""
    with (
        scratch_database(pg_server_url, "inferq_durable") as database_url,
        batch_fleet(tmp_path, tiny_gguf, database_url=database_url) as stack,
    ):
        yield stack
