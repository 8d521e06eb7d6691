"""A bench for the batch scheduler's fault tests: real Redis and Postgres of
the test's own, batch schedulers built in the test process (so a test can
step them one pass at a time, or stall one), and on request a real `inferq
worker` process that runs the lines."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import ColumnElement, Engine, select, update

from api.batches import feeding, protocol, store
from api.batches.scheduler import BatchScheduler
from api.files import store as files_store
from inferq.migrate import upgrade
from schemas import batches as b
from schemas.db import make_engine
from schemas.queue import make_celery
from schemas.registry import load_registry
from schemas.settings import Settings
from schemas.tables import BATCH_LINES, USAGE, BatchRecord, utcnow
from tests.support.batches import chat_line, jsonl
from tests.support.deploy import FAST_BATCHES, model_dir, stack_env
from tests.support.procs import inferq, stop
from tests.support.redis_server import start_redis
from tests.support.servers import Server

CHAT = "/v1/chat/completions"


def chat_lines(n: int, prefix: str = "line", **body: Any) -> bytes:
    return jsonl([chat_line(f"{prefix}-{i}", f"hi {i}", **body) for i in range(n)])


@dataclass
class Bench:
    settings: Settings
    db: Engine
    redis: redis.Redis
    env: dict[str, str]
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def scheduler(self, cls: type[BatchScheduler] = BatchScheduler) -> BatchScheduler:
        registry = load_registry(self.settings.models_dir)
        celery = make_celery(self.settings, name="inferq-test-scheduler")
        return cls(
            self.settings, self.db, registry, redis.Redis.from_url(self.env["REDIS_URL"]), celery
        )

    def submit(self, data: bytes, endpoint: str = CHAT) -> str:
        file = files_store.create_file(
            self.db, filename="in.jsonl", purpose="batch", chunks=[data], max_bytes=None
        )
        create = protocol.BatchCreate(
            input_file_id=file.id, endpoint=endpoint, completion_window="24h"
        )
        batch_id: str = store.create_batch(self.db, create=create).id
        return batch_id

    def batch(self, batch_id: str) -> BatchRecord:
        record = store.get_batch(self.db, batch_id=batch_id)
        assert record is not None
        return record

    def lines(self, batch_id: str) -> list[Any]:
        with self.db.connect() as conn:
            query = (
                select(BATCH_LINES)
                .where(BATCH_LINES.c.batch_id == batch_id)
                .order_by(BATCH_LINES.c.line)
            )
            return list(conn.execute(query).all())

    def usage_ids(self) -> list[str]:
        with self.db.connect() as conn:
            return [r[0] for r in conn.execute(select(USAGE.c.request_id))]

    def output(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        data = b"".join(files_store.iter_content(self.db, file_id=file_id))
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def hold(
        self,
        *where: ColumnElement[bool],
        chunk: str,
        worker: str,
        attempts: int,
        lease_s: float,
    ) -> None:
        """Mark the lines `where` says as running in `chunk` of `worker`, on a
        lease of `lease_s` seconds from now (negative: lapsed already)."""
        with self.db.begin() as conn:
            conn.execute(
                update(BATCH_LINES)
                .where(*where)
                .values(
                    state=b.RUNNING,
                    chunk=chunk,
                    worker=worker,
                    attempts=attempts,
                    lease_until=utcnow() + timedelta(seconds=lease_s),
                )
            )

    def start_worker(self, timeout: float = 60) -> None:
        self.procs.append(inferq(["worker", "--model", "tiny"], self.env, self.log))
        deadline = time.monotonic() + timeout
        while "tiny" not in feeding.live_slots(self.redis):
            assert self.procs[-1].poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def run_until(
        self, scheduler: BatchScheduler, batch_id: str, status: set[str], timeout: float
    ) -> BatchRecord:
        """Pass after pass of `scheduler` until the batch reaches `status`."""
        deadline = time.monotonic() + timeout
        while True:
            scheduler.pass_once()
            record = self.batch(batch_id)
            if record.status in status:
                return record
            assert time.monotonic() < deadline, (record.status, self.log.read_text()[-3000:])
            time.sleep(0.1)


@pytest.fixture
def bench(tmp_path: Path, tiny_gguf: Path, pg_url: str) -> Iterator[Bench]:
    models = model_dir(tmp_path, tiny_gguf, context=512, parallel=2)
    upgrade(pg_url)
    server: Server = start_redis()
    env = stack_env(server.url, pg_url, models, None, **FAST_BATCHES)
    settings = Settings.model_validate(
        {
            "REDIS_URL": server.url,
            "DATABASE_URL": pg_url,
            "models_dir": models,
            "batch_tick": 0.2,
            "batch_lease": 3,
            "batch_chunk_lines": 4,
        }
    )
    db = make_engine(pg_url)
    bench = Bench(settings, db, redis.Redis.from_url(server.url), env, tmp_path / "bench.log")
    try:
        yield bench
    finally:
        for proc in bench.procs:
            stop(proc)
        db.dispose()
        server.stop()
