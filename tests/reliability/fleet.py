"""A private inferq deployment a test may break: its own redis-server (which it
may kill and start again on the same port), its own Postgres database, one
`inferq api` and any number of `inferq worker` processes of the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, text

from tests.support.procs import base_env, free_port, inferq, stop, wait_status
from tests.support.servers import start_redis

MODEL = "tiny"
# Long enough that a stream is still generating when the test strikes.
CONTEXT = 4096


@dataclass
class Fleet:
    url: str
    env: dict[str, str]
    log: Path
    redis_exe: Path
    redis_port: int
    redis_dir: Path
    database_url: str
    redis_proc: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- processes --------------------------------------------------------

    def start_api(self) -> None:
        self.api = inferq(["api"], self.env, self.log)
        wait_status(self.url + "/v1/models", 200, 30, self.log)

    def start_worker(self, name: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = inferq(["worker", "--model", MODEL], self.env, self.log)
        self.workers[name] = proc
        if wait:
            self.wait_live(proc.pid)
        return proc

    def kill_worker(self, name: str) -> None:
        proc = self.workers[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_redis(self) -> None:
        assert self.redis_proc is not None
        self.redis_proc.kill()
        self.redis_proc.wait(10)

    def start_redis(self) -> None:
        self.redis_proc = subprocess.Popen(
            [str(self.redis_exe), "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.redis_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.redis().ping():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not come back"
            time.sleep(0.05)

    # -- what Redis and Postgres say ----------------------------------------

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=2)

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
        engine = create_engine(self.database_url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with engine.connect() as conn:
                    rows = conn.execute(
                        text("SELECT * FROM usage WHERE request_id LIKE :r ORDER BY id"),
                        {"r": like},
                    )
                    found = [dict(row) for row in rows.mappings()]
                if len(found) >= at_least or time.monotonic() > deadline:
                    return found
                time.sleep(0.1)
        finally:
            engine.dispose()

    # -- requests ------------------------------------------------------------

    def chat(self, content: str = "hello", timeout: float = 60, **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=timeout)


@contextmanager
def fleet(root: Path, tiny_gguf: Path, pg_server_url: str, **settings: str) -> Iterator[Fleet]:
    models = root / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "tiny.yaml").write_text(
        f"name: tiny\nparameters:\n  model: tiny.gguf\ncontext_size: {CONTEXT}\n"
        "parallel: 2\nthreads: 1\n"
    )
    # A model no worker will ever serve.
    (models / "other.yaml").write_text("name: other\nparameters:\n  model: tiny.gguf\n")
    database = f"inferq_fleet_{int(time.time() * 1000)}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    server = start_redis()
    port = free_port()
    database_url = pg_server_url.rsplit("/", 1)[0] + "/" + database
    env = base_env(
        REDIS_URL=server.url,
        DATABASE_URL=database_url,
        INFERQ_MODELS_DIR=str(models),
        INFERQ_PORT=str(port),
        INFERQ_REQUEST_TIMEOUT="60",
        INFERQ_BATCH_SCHEDULER="false",
        **settings,
    )
    stack = Fleet(
        f"http://127.0.0.1:{port}",
        env,
        root / "fleet.log",
        server.executable,
        server.port,
        server.workdir,
        database_url,
        redis_proc=server.process,
    )
    try:
        assert inferq(["migrate"], env, stack.log).wait(60) == 0, stack.log.read_text()
        yield stack
    finally:
        procs = [stack.api, *stack.workers.values()]
        for proc in procs:
            if proc is not None:
                stop(proc, signal.SIGKILL)
        if stack.redis_proc is not None and stack.redis_proc is not server.process:
            stop(stack.redis_proc, signal.SIGKILL)
        server.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
