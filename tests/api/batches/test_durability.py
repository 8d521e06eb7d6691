"""A batch survives its processes: the worker killed with SIGKILL mid-batch,
the API killed and restarted, Redis restarted (losing every queued message).
Each time the batch completes with every line exactly once in its output.

These run their own stack (a private Redis they may restart, their own
database) with short leases, so a lost line comes back within seconds."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from sqlalchemy import create_engine, text

from tests.support.batches import by_custom_id, chat_line, read_lines, submit, wait, wait_for
from tests.support.procs import base_env, free_port, inferq, stop, wait_status
from tests.support.servers import start_redis

LINES = 300


@dataclass
class Durable:
    url: str
    env: dict[str, str]
    log: Path
    redis_exe: Path
    redis_port: int
    redis_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=5)

    def start(self, name: str, args: list[str]) -> None:
        self.procs[name] = inferq(args, self.env, self.log)

    def start_redis(self) -> None:
        self.procs["redis"] = subprocess.Popen(
            [str(self.redis_exe), "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.redis_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def durable(tmp_path: Path, tiny_gguf: Path, pg_server_url: str) -> Iterator[Durable]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "tiny.yaml").write_text(
        "name: tiny\nparameters:\n  model: tiny.gguf\ncontext_size: 512\nparallel: 4\nthreads: 1\n"
    )
    database = f"inferq_durable_{int(time.time() * 1000)}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    redis = start_redis()
    port = free_port()
    env = base_env(
        REDIS_URL=redis.url,
        DATABASE_URL=pg_server_url.rsplit("/", 1)[0] + "/" + database,
        INFERQ_MODELS_DIR=str(models),
        INFERQ_PORT=str(port),
        INFERQ_BATCH_TICK="0.2",
        INFERQ_BATCH_LEASE="3",
        INFERQ_HEARTBEAT_INTERVAL="0.5",
        INFERQ_BATCH_CHUNK_LINES="4",
    )
    stack = Durable(
        f"http://127.0.0.1:{port}",
        env,
        tmp_path / "stack.log",
        redis.executable,
        redis.port,
        redis.workdir,
    )
    stack.procs["redis"] = redis.process
    assert inferq(["migrate"], env, stack.log).wait(60) == 0, stack.log.read_text()
    stack.start("api", ["api"])
    stack.start("worker", ["worker", "--model", "tiny"])
    try:
        wait_status(stack.url + "/health", 200, 60, stack.log)
        yield stack
    finally:
        for proc in stack.procs.values():
            stop(proc, signal.SIGKILL)
        redis.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def _run_through(stack: Durable, disrupt: Callable[[Durable], None]) -> None:
    client = stack.client()
    lines = [
        chat_line(f"line-{i}", f"tell me about {i}", max_tokens=96, ignore_eos=True, seed=i)
        for i in range(LINES)
    ]
    batch = submit(client, lines)
    running = wait_for(client, batch.id, 60, done=LINES // 12)
    # The disruption must hit a batch with work left, or it proves nothing.
    assert running.status == "in_progress" and running.request_counts is not None
    assert running.request_counts.completed < LINES // 2
    disrupt(stack)
    batch = wait(client, batch.id, 180)
    assert batch.status == "completed", (batch, stack.log.read_text()[-4000:])
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (
        LINES,
        LINES,
        0,
    )
    output = read_lines(client, batch.output_file_id)
    # Exactly once each, in input order, every one a full answer.
    assert [line["custom_id"] for line in output] == [f"line-{i}" for i in range(LINES)]
    for line in by_custom_id(output).values():
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["usage"]["completion_tokens"] == 96
    assert batch.error_file_id is None


def _max_attempts(stack: Durable) -> int:
    engine = create_engine(stack.env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT max(attempts) FROM batch_lines")).scalar_one())
    finally:
        engine.dispose()


def test_worker_killed_mid_batch(durable: Durable) -> None:
    def kill_worker(stack: Durable) -> None:
        # While it holds lines (the tiny model finishes a chunk in a blink).
        engine = create_engine(stack.env["DATABASE_URL"])
        query = text("SELECT count(*) FROM batch_lines WHERE state = 'running'")
        try:
            deadline = time.monotonic() + 30
            while True:
                with engine.connect() as conn:
                    if conn.execute(query).scalar_one():
                        break
                assert time.monotonic() < deadline, "the worker never held a line"
        finally:
            engine.dispose()
        stack.procs["worker"].send_signal(signal.SIGKILL)
        stack.procs["worker"].wait(10)
        stack.start("worker", ["worker", "--model", "tiny"])

    _run_through(durable, kill_worker)
    # Lines the dead worker held ran again, on the new one.
    assert _max_attempts(durable) >= 2


def test_api_restarted_mid_batch(durable: Durable) -> None:
    def restart_api(stack: Durable) -> None:
        stack.procs["api"].send_signal(signal.SIGKILL)
        stack.procs["api"].wait(10)
        time.sleep(1.0)
        stack.start("api", ["api"])
        wait_status(stack.url + "/v1/models", 200, 30, stack.log)

    _run_through(durable, restart_api)


def test_redis_restarted_mid_batch(durable: Durable) -> None:
    def restart_redis(stack: Durable) -> None:
        # The worker is frozen first, so chunks pile up in Redis; then a new,
        # empty server takes the port: everything queued is gone.
        worker = stack.procs["worker"]
        worker.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.0)
            old = stack.procs["redis"]
            old.kill()
            old.wait(10)
            stack.start_redis()
        finally:
            worker.send_signal(signal.SIGCONT)

    _run_through(durable, restart_redis)
    # The chunks queued in the old Redis were lost and their lines put back.
    assert "back to pending" in durable.log.read_text()
