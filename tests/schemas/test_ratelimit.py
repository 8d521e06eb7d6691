"""schemas/ratelimit.py on a real Redis: the token-bucket math of admission
(all or nothing, the wait of a refusal, continuous refill) and of settling
a job's real token count (give back, or leave a debt)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from schemas import keys, ratelimit
from schemas.accounts import JobAccount
from schemas.ratelimit import Admission, Bucket
from tests.support.procs import free_port


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def name() -> str:
    return keys.rate_bucket(uuid.uuid4().hex, "test")


def admit(redis_url: str, *buckets: Bucket) -> Admission:
    async def go() -> Admission:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await ratelimit.admit(client, list(buckets))
        finally:
            await client.aclose()

    return asyncio.run(go())


def level(client: redis.Redis, key: str) -> float:
    raw = client.hget(key, "level")
    assert raw is not None, f"{key} is not there"
    return float(raw)


def test_admits_until_empty_then_says_how_long_to_wait(redis_url: str) -> None:
    key = name()
    # 3 requests per minute: one comes back every 20 s.
    rpm = Bucket(key, capacity=3, period=60, cost=1)
    remaining = []
    for _ in range(3):
        got = admit(redis_url, rpm)
        assert got.admitted and got.wait == 0
        remaining.append(got.states[0].remaining)
    assert remaining == [2, 1, 0]
    refused = admit(redis_url, rpm)
    assert not refused.admitted
    # Nearly a whole 20 s: at most the time this test ran has refilled.
    assert 15 < refused.wait <= 20
    assert refused.blocking() is refused.states[0]
    assert refused.states[0].used == 3


def test_takes_from_every_bucket_or_from_none(redis_url: str, sync_redis: redis.Redis) -> None:
    roomy, tight = name(), name()
    first = admit(redis_url, Bucket(roomy, 100, 60, 10), Bucket(tight, 5, 60, 5))
    assert first.admitted
    assert [s.remaining for s in first.states] == [90, 0]
    before = level(sync_redis, roomy)
    refused = admit(redis_url, Bucket(roomy, 100, 60, 10), Bucket(tight, 5, 60, 5))
    assert not refused.admitted
    # The roomy bucket passed but gave nothing: the refusal took no tokens.
    assert refused.states[0].wait == 0 and refused.states[1].wait > 0
    assert refused.blocking() is refused.states[1]
    assert level(sync_redis, roomy) == before


def test_refills_continuously(redis_url: str) -> None:
    key = name()
    # 10 per second.
    bucket = Bucket(key, capacity=10, period=1, cost=10)
    assert admit(redis_url, bucket).admitted
    assert not admit(redis_url, Bucket(key, 10, 1, 5)).admitted
    time.sleep(0.6)
    # At least 6 tokens came back, never more than the capacity.
    got = admit(redis_url, Bucket(key, 10, 1, 5))
    assert got.admitted
    time.sleep(1.5)
    full = admit(redis_url, Bucket(key, 10, 1, 1))
    assert full.admitted and full.states[0].remaining == 9


def test_a_cost_above_the_capacity_takes_a_full_bucket(redis_url: str) -> None:
    key = name()
    got = admit(redis_url, Bucket(key, capacity=50, period=60, cost=500))
    assert got.admitted and got.states[0].remaining == 0
    assert not admit(redis_url, Bucket(key, 50, 60, 1)).admitted


def test_settle_gives_back_what_a_job_did_not_use(redis_url: str, sync_redis: redis.Redis) -> None:
    key = name()
    assert admit(redis_url, Bucket(key, capacity=100, period=60, cost=80)).admitted
    ratelimit.settle(sync_redis, JobAccount(key_id="k", reserved_tokens=80, buckets=[key]), 30)
    # 20 left + 50 back (+ the little refilled meanwhile).
    assert 70 <= level(sync_redis, key) < 72
    # Never above the capacity.
    ratelimit.settle(sync_redis, JobAccount(key_id="k", reserved_tokens=80, buckets=[key]), 0)
    assert level(sync_redis, key) == 100


def test_settle_of_a_job_that_used_more_leaves_a_debt(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    key = name()
    assert admit(redis_url, Bucket(key, capacity=100, period=60, cost=50)).admitted
    account = JobAccount(key_id="k", reserved_tokens=50, buckets=[key])
    ratelimit.settle(sync_redis, account, 250)
    assert -151 < level(sync_redis, key) < -145
    # The debt delays the next request: 151 tokens at 100 per minute.
    refused = admit(redis_url, Bucket(key, 100, 60, 1))
    assert not refused.admitted
    assert 85 < refused.wait <= 91


def test_settle_charges_what_admission_took_from_a_smaller_bucket(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # The estimate (500) was capped at this bucket's 100: it took 100, so a
    # job of 30 tokens gives 70 back, not 470.
    key = name()
    assert admit(redis_url, Bucket(key, capacity=100, period=60, cost=500)).admitted
    ratelimit.settle(sync_redis, JobAccount(key_id="k", reserved_tokens=500, buckets=[key]), 30)
    assert 70 <= level(sync_redis, key) < 72


def test_buckets_expire_once_refilled(redis_url: str, sync_redis: redis.Redis) -> None:
    key = name()
    assert admit(redis_url, Bucket(key, capacity=10, period=60, cost=5)).admitted
    # 30 s to refill + one period: then it is gone, which reads as full.
    ttl = sync_redis.pttl(key)
    assert 60_000 < ttl <= 90_000
    # A settle never creates a bucket that is gone.
    gone = name()
    ratelimit.settle(sync_redis, JobAccount(key_id="k", reserved_tokens=5, buckets=[gone]), 99)
    assert not sync_redis.exists(gone)


def test_refund_gives_a_whole_reservation_back(redis_url: str, sync_redis: redis.Redis) -> None:
    key = name()
    assert admit(redis_url, Bucket(key, capacity=3, period=60, cost=1)).admitted

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await ratelimit.refund(client, [key], 1)
        finally:
            await client.aclose()

    asyncio.run(go())
    assert level(sync_redis, key) == 3


def test_settle_never_raises_when_redis_is_away() -> None:
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    account = JobAccount(key_id="k", reserved_tokens=5, buckets=[name()])
    ratelimit.settle(away, account, 10)
    # An account without token buckets does not even try.
    ratelimit.settle(away, JobAccount(key_id="k"), 10)
    ratelimit.settle(away, None, 10)
