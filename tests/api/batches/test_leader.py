"""The batch scheduler's leadership on real Redis and Postgres: a leader
frozen inside a scheduler transaction cannot keep its successor out."""

from __future__ import annotations

import time

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from api.batches.leader import Leadership
from schemas.db import make_engine


@pytest.fixture
def db(pg_engine: Engine) -> Engine:
    return pg_engine


def test_a_leader_frozen_in_a_transaction_is_taken_over(db: Engine, other_redis_url: str) -> None:
    client = redis.Redis.from_url(other_redis_url)
    stale = Leadership(client, db, "stale", ttl=0.5)
    assert stale.lead() and stale.epoch == 1
    # The stale leader is inside a scheduler transaction (it holds the epoch
    # row) when it freezes; its lock then lapses.
    conn = db.connect()
    transaction = conn.begin()
    stale.check(conn)
    time.sleep(0.8)
    successor_db = make_engine(str(db.url.render_as_string(hide_password=False)))
    try:
        fresh = Leadership(client, successor_db, "fresh", ttl=5)
        started = time.monotonic()
        assert fresh.lead()
        assert fresh.epoch == 2
        assert time.monotonic() - started < 10
        # Nothing of the stale leader commits: its session is gone.
        with pytest.raises(DBAPIError):
            transaction.commit()
    finally:
        conn.close()
        successor_db.dispose()
        client.close()
