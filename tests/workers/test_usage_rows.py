"""A worker's usage row names the key its job is charged to and the prompt
tokens its slot reused, on real Postgres; a job without an account (auth
off) is nobody's; a row recorded twice (a redelivered job) stays one."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from sqlalchemy import Engine, select

from inferq.migrate import upgrade
from schemas.accounts import JobAccount
from schemas.db import make_engine
from schemas.registry import ModelConfig, Parameters
from schemas.tables import USAGE
from workers.job import accounting
from workers.usage import writer_for


@dataclass
class Context:
    config: ModelConfig
    redis: redis.Redis
    db: Engine
    worker_id: str


def test_rows_carry_key_and_cached_tokens(pg_url: str) -> None:
    upgrade(pg_url)
    db = make_engine(pg_url)
    try:
        config = ModelConfig(name="tiny", parameters=Parameters(model="tiny.gguf"))
        context = Context(config, None, db, "w-1")  # type: ignore[arg-type]
        keyed = accounting(
            context,
            request_id="r-keyed",
            endpoint="chat.completions",
            account=JobAccount(key_id="key1", reserved_tokens=30, buckets=["b"]),
        )
        keyed("completed", 12, 5, 3.5, cached=9)
        # Redelivered and run again: still one row, the first.
        keyed("completed", 12, 5, 3.5, cached=0)
        accounting(context, request_id="r-open", endpoint="completions")("failed", 4, 0, None)
        assert writer_for(db).flush(10)
        with db.connect() as conn:
            rows = conn.execute(select(USAGE).order_by(USAGE.c.request_id)).all()
    finally:
        db.dispose()
    fields = ["request_id", "key_id", "model", "endpoint", "prompt_tokens"]
    fields += ["completion_tokens", "cached_tokens", "batch_id", "status", "worker"]
    got = [tuple(r._mapping[f] for f in fields) for r in rows]
    assert got == [
        ("r-keyed", "key1", "tiny", "chat.completions", 12, 5, 9, None, "completed", "w-1"),
        ("r-open", None, "tiny", "completions", 4, 0, 0, None, "failed", "w-1"),
    ]
