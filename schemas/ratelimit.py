"""Per-key token buckets in Redis, shared by every API replica and worker.

A bucket holds at most `capacity` units (requests or tokens) and refills
continuously at capacity / period per second, so a limit of 60 RPM frees one
request a second rather than sixty at the top of each minute (how OpenAI says
its limits replenish). Each bucket is a Redis hash (schemas.keys.rate_bucket)
of its level, the time of that level, its capacity and period.

Both scripts read the clock with Redis TIME: every replica's admission and
every worker's settlement use one clock, so skewed hosts cannot hand out
extra tokens. A bucket's TTL is the time it needs to refill plus one period:
an idle key's buckets disappear, and a missing bucket reads as full, which is
exactly what it would have refilled to.

`admit` checks several buckets at once and takes from all of them only if all
pass. `settle` corrects a job's token buckets once its real token count is
known: a job that used fewer tokens than its estimate gives the rest back,
one that used more leaves the bucket below zero, a debt that delays the key's
next requests."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from schemas.accounts import JobAccount

log = logging.getLogger(__name__)

# Refill first (never above capacity), then test every bucket, then take from
# all or none. Levels go back as strings: Redis truncates Lua numbers to
# integers. Returns {admitted, level1, wait1, level2, wait2, ...}, the levels
# after the deduction when admitted, before it when refused.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local admitted = true
for i = 1, #KEYS do
  local cap = tonumber(ARGV[3 * i - 2])
  local period = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local h = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = cap
  if h[1] then
    local elapsed = math.max(0, now - tonumber(h[2]))
    level = math.min(cap, tonumber(h[1]) + elapsed * cap / period)
  end
  levels[i] = level
  if level < cost then admitted = false end
end
local out = {admitted and 1 or 0}
for i = 1, #KEYS do
  local cap = tonumber(ARGV[3 * i - 2])
  local period = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local rate = cap / period
  local level = levels[i]
  local wait = 0
  if admitted then
    level = level - cost
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', tostring(now),
      'cap', tostring(cap), 'period', tostring(period))
    redis.call('PEXPIRE', KEYS[i], math.ceil(((cap - level) / rate + period) * 1000))
  elseif level < cost then
    wait = (cost - level) / rate
  end
  out[2 * i] = tostring(level)
  out[2 * i + 1] = tostring(wait)
end
return out
"""

# Give back min(reserved, capacity) - used to each bucket that still exists
# (admission took min(estimate, capacity) from each). A bucket that expired
# meanwhile had refilled completely and stays so: its debt is forgiven.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reserved = tonumber(ARGV[1])
local used = tonumber(ARGV[2])
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'level', 'ts', 'cap', 'period')
  if h[1] and h[3] and h[4] then
    local cap = tonumber(h[3])
    local period = tonumber(h[4])
    local rate = cap / period
    local elapsed = math.max(0, now - tonumber(h[2]))
    local level = math.min(cap, tonumber(h[1]) + elapsed * rate)
    level = math.min(cap, level + math.min(reserved, cap) - used)
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil(((cap - level) / rate + period) * 1000))
  end
end
return #KEYS
"""

_ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()
_SETTLE_SHA = hashlib.sha1(_SETTLE.encode()).hexdigest()


@dataclass(frozen=True)
class Bucket:
    """One bucket to draw `cost` from: `capacity` units refilled over `period`
    seconds. A cost above the capacity could never pass; callers cap it."""

    key: str
    capacity: int
    period: float
    cost: int

    @property
    def rate(self) -> float:
        """Units refilled per second."""
        return self.capacity / self.period


@dataclass(frozen=True)
class BucketState:
    """A bucket after an admission: its level (after the deduction when
    admitted; may be negative after a debt), and when refused, the seconds
    until this bucket alone would let the request pass (0 if it already did)."""

    bucket: Bucket
    level: float
    wait: float

    @property
    def remaining(self) -> int:
        return max(0, int(self.level))

    @property
    def used(self) -> int:
        return max(0, round(self.bucket.capacity - self.level))

    @property
    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.bucket.capacity - self.level) / self.bucket.rate)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    states: tuple[BucketState, ...]

    @property
    def wait(self) -> float:
        """Seconds until every bucket would let the request pass."""
        return max((s.wait for s in self.states), default=0.0)

    def blocking(self) -> BucketState | None:
        """The bucket that refuses longest (None when admitted)."""
        if self.admitted:
            return None
        return max(self.states, key=lambda s: s.wait)


def _admit_args(buckets: Sequence[Bucket]) -> list[str | int | float]:
    args: list[str | int | float] = []
    for b in buckets:
        if b.capacity <= 0 or b.period <= 0:
            raise ValueError(f"bucket {b.key} needs a positive capacity and period")
        args += [b.capacity, b.period, max(0, min(b.cost, b.capacity))]
    return args


def _admission(buckets: Sequence[Bucket], reply: Sequence[bytes | str | int]) -> Admission:
    states = tuple(
        BucketState(b, float(reply[2 * i + 1]), float(reply[2 * i + 2]))
        for i, b in enumerate(buckets)
    )
    return Admission(admitted=int(reply[0]) == 1, states=states)


async def admit(client: aioredis.Redis, buckets: Sequence[Bucket]) -> Admission:
    """Take each bucket's cost (capped at its capacity) from all of `buckets`
    if every one has it, atomically; one round trip."""
    if not buckets:
        return Admission(True, ())
    keys_and_args = [*(b.key for b in buckets), *_admit_args(buckets)]
    try:
        reply = await client.evalsha(_ADMIT_SHA, len(buckets), *keys_and_args)
    except NoScriptError:
        # First use on this Redis (or after a restart): EVAL caches it.
        reply = await client.eval(_ADMIT, len(buckets), *keys_and_args)
    return _admission(buckets, reply)


def _settle_sync(client: redis.Redis, keys: Sequence[str], reserved: int, used: int) -> None:
    try:
        client.evalsha(_SETTLE_SHA, len(keys), *keys, reserved, used)
    except NoScriptError:
        client.eval(_SETTLE, len(keys), *keys, reserved, used)


async def refund(client: aioredis.Redis, keys: Sequence[str], amount: int) -> None:
    """Give `amount` back to each of `keys` (an admission whose job was never
    enqueued: backpressure refused it, or Redis failed under it)."""
    if not keys:
        return
    try:
        await client.evalsha(_SETTLE_SHA, len(keys), *keys, amount, 0)
    except NoScriptError:
        await client.eval(_SETTLE, len(keys), *keys, amount, 0)


def settle(client: redis.Redis, account: JobAccount | None, used_tokens: int) -> None:
    """Correct the token buckets `account` reserved from with the tokens the
    job really used (prompt + completion). Never raises: a Redis error only
    costs the correction (logged), never the job or its answer."""
    if account is None or not account.buckets:
        return
    try:
        _settle_sync(client, account.buckets, account.reserved_tokens, max(0, used_tokens))
    except Exception as exc:
        log.warning("could not settle a job's rate-limit buckets: %s", exc)
