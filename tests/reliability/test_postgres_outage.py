"""Postgres goes away mid-batch and comes back.

While it is down, interactive requests keep being answered (their usage rows
wait in the worker's memory) and batch work pauses: the scheduler's passes
fail and retry, the worker keeps its finished results and retries them, and
leases that lapsed meanwhile are not reclaimed before the workers had a lease
to renew them. When it returns, everything resumes without a restart: the
batch completes with every line exactly once, and every usage row (batch
lines and the interactive requests) is in the database exactly once.

The test owns its Postgres cluster (stopped with a fast shutdown and started
again on the same data directory and port), its Redis and its processes."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from sqlalchemy import create_engine, text

from tests.support.batches import chat_line, read_lines, submit, wait, wait_for
from tests.support.procs import base_env, free_port, inferq, stop, wait_status
from tests.support.servers import PG_SUPERUSER, Server, _spawn, _unprivileged, start_postgres, start_redis

LINES = 60
OUTAGE_S = 6.0  # longer than the lease (3 s): leases lapse while it is down


@dataclass
class Cluster:
    """A throwaway Postgres that can be stopped and started again."""

    server: Server
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.process = self.server.process

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # fast shutdown: sessions are cut
        self.process.wait(20)

    def start(self) -> None:
        server = self.server
        argv = [
            str(server.executable), "-D", str(server.workdir / "data"), "-p", str(server.port),
            "-h", "127.0.0.1", "-k", str(server.workdir),
            "-c", "fsync=off", "-c", "synchronous_commit=off",
        ]  # fmt: skip
        self.process = _spawn(
            argv,
            cwd=server.workdir,
            logfile=server.workdir / "postgres.log",
            run_as=_unprivileged(),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=server.port, user=PG_SUPERUSER, dbname="postgres",
                    connect_timeout=2,
                ):  # fmt: skip
                    return
            except psycopg.Error:
                assert time.monotonic() < deadline, "postgres did not come back"
                time.sleep(0.1)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self.server.stop()


@dataclass
class OutageStack:
    url: str
    env: dict[str, str]
    log: Path
    cluster: Cluster
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def outage(tmp_path: Path, tiny_gguf: Path) -> Iterator[OutageStack]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "tiny.yaml").write_text(
        "name: tiny\nparameters:\n  model: tiny.gguf\ncontext_size: 512\nparallel: 4\nthreads: 1\n"
    )
    cluster = Cluster(start_postgres())
    redis = start_redis()
    port = free_port()
    env = base_env(
        REDIS_URL=redis.url,
        DATABASE_URL=cluster.server.url,
        INFERQ_MODELS_DIR=str(models),
        INFERQ_PORT=str(port),
        INFERQ_REQUEST_TIMEOUT="30",
        INFERQ_BATCH_TICK="0.2",
        INFERQ_BATCH_LEASE="3",
        INFERQ_HEARTBEAT_INTERVAL="0.5",
        INFERQ_BATCH_CHUNK_LINES="4",
    )
    stack = OutageStack(f"http://127.0.0.1:{port}", env, tmp_path / "stack.log", cluster)
    try:
        assert inferq(["migrate"], env, stack.log).wait(60) == 0, stack.log.read_text()
        stack.procs.append(inferq(["api"], env, stack.log))
        stack.procs.append(inferq(["worker", "--model", "tiny"], env, stack.log))
        wait_status(stack.url + "/health", 200, 60, stack.log)
        yield stack
    finally:
        for proc in stack.procs:
            stop(proc, signal.SIGKILL)
        redis.stop()
        cluster.close()


def _chat(url: str, content: str) -> tuple[int, str, float]:
    started = time.monotonic()
    response = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
        },
        timeout=30,
    )
    body = response.json()
    return response.status_code, str(body.get("id", body)), time.monotonic() - started


def _until_lines_run(stack: OutageStack) -> None:
    """Until the worker holds lines: the outage must catch results in flight."""
    engine = create_engine(stack.env["DATABASE_URL"])
    query = text("SELECT count(*) FROM batch_lines WHERE state = 'running'")
    try:
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                if conn.execute(query).scalar_one():
                    return
            assert time.monotonic() < deadline, "the worker never held a line"
    finally:
        engine.dispose()


def test_postgres_outage_mid_batch(outage: OutageStack) -> None:
    client = outage.client()
    lines = [
        chat_line(f"line-{i}", f"tell me about {i}", max_tokens=160, ignore_eos=True, seed=i)
        for i in range(LINES)
    ]
    batch = submit(client, lines)
    running = wait_for(client, batch.id, 60, done=LINES // 10)
    assert running.status == "in_progress"
    assert running.request_counts is not None and running.request_counts.completed < LINES // 2
    _until_lines_run(outage)
    outage.cluster.stop()
    down_at = time.monotonic()
    interactive: list[str] = []
    # Interactive requests keep being served while the database is away.
    while time.monotonic() - down_at < OUTAGE_S:
        status, request_id, took = _chat(outage.url, f"still there? {len(interactive)}")
        assert status == 200, (status, request_id, outage.log.read_text()[-3000:])
        assert took < 10, took
        interactive.append(request_id)
        time.sleep(0.5)
    assert len(interactive) >= 3
    # The Files and Batches API needs the database: a 503 to retry, not a 500.
    started = time.monotonic()
    polled = httpx.get(f"{outage.url}/v1/batches/{batch.id}", timeout=30)
    assert polled.status_code == 503, polled.text
    assert polled.json()["error"]["code"] == "database_unavailable"
    assert int(polled.headers["retry-after"]) >= 1
    assert time.monotonic() - started < 10
    outage.cluster.start()

    # Batch work resumes by itself; every line exactly once, in order.
    done = wait(client, batch.id, 180)
    assert done.status == "completed", (done, outage.log.read_text()[-4000:])
    counts = done.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (
        LINES,
        LINES,
        0,
    )
    output = read_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"line-{i}" for i in range(LINES)]
    for line in output:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["usage"]["completion_tokens"] == 160
    # After the outage the worker still serves at once.
    status, request_id, took = _chat(outage.url, "and now?")
    assert status == 200 and took < 10
    interactive.append(request_id)

    # Usage: one row per batch line and per interactive request, none lost,
    # none doubled (the buffered rows reach the database within seconds).
    engine = create_engine(outage.env["DATABASE_URL"])
    expected = Counter({f"{batch.id}:{i}": 1 for i in range(LINES)} | dict.fromkeys(interactive, 1))
    try:
        deadline = time.monotonic() + 20
        while True:
            with engine.connect() as conn:
                ids = Counter(r[0] for r in conn.execute(text("SELECT request_id FROM usage")))
            if ids == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert ids == expected, (ids - expected, expected - ids)
    log = outage.log.read_text()
    assert "batch scheduler tick failed" in log  # the outage was real
    # The worker finished lines while the database was away and wrote them
    # afterwards; no lease was reclaimed, so no line ran twice.
    assert "bulk results written again" in log
    assert "back to pending" not in log
    engine = create_engine(outage.env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            attempts = conn.execute(text("SELECT max(attempts) FROM batch_lines")).scalar_one()
    finally:
        engine.dispose()
    assert attempts == 1
