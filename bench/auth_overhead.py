"""What accounts add to one request on the API's path, measured in process
against a real Redis and database, to the microsecond: whole-system runs
(bench.auth_bench) swing by tens of milliseconds between rounds on a shared
machine, far more than the few hundred microseconds asked about.

Per request the API does, with auth off: one Redis GET of the key-version
counter (`KeyCache.current`). With auth on and a key with limits, also: the
key's hash compared (`authenticate`) and one EVALSHA of the token-bucket
script (`limits.admit`: rpm, tpm and a quota window). The worker settles the
buckets once per job (`ratelimit.settle`), off the API's path but on the same
cores. The rounds alternate A (auth off), B (auth on) and W (the worker's
settle) and report the median and 99th percentile per call, and their
median and range over rounds.

    .venv/bin/python -m bench.auth_overhead --redis-url redis://127.0.0.1:6379/15
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio as aioredis

from api.accounts import limits
from api.accounts.auth import KeyCache, authenticate
from api.accounts.principal import Principal
from api.accounts.store import Limits, create_key
from inferq.migrate import upgrade
from schemas.accounts import QuotaRule
from schemas.db import make_engine
from schemas.jobs import GenerateJob, Message
from schemas.ratelimit import settle
from schemas.sampling import SamplingOptions
from schemas.settings import Settings

Step = Callable[[], Awaitable[None]]


async def _time(step: Step, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await step()
        out.append((time.perf_counter() - started) * 1e6)
    return out


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99)]


async def run(args: argparse.Namespace) -> str:
    client = aioredis.Redis.from_url(args.redis_url)
    sync = redis.Redis.from_url(args.redis_url)
    await client.flushdb()
    with tempfile.TemporaryDirectory(prefix="inferq-auth-overhead-") as tmp:
        off_url, on_url = f"sqlite:///{tmp}/off.db", f"sqlite:///{tmp}/on.db"
        upgrade(off_url)
        upgrade(on_url)
        off_db, on_db = make_engine(off_url), make_engine(on_url)
        quota = QuotaRule(model="m", window=86400, max_tokens=10**12, max_requests=10**9)
        _, token = create_key(
            on_db, name="bench", limits=Limits(rpm=10**9, tpm=10**12, quotas=[quota])
        )
        settings = Settings()
        off_cache, on_cache = KeyCache(off_db, client, settings), KeyCache(on_db, client, settings)
        job = GenerateJob(
            request_id="r",
            model="m",
            endpoint="chat.completions",
            messages=[Message(role="user", content="x" * 400)],
            sampling=SamplingOptions(max_tokens=64),
        )

        async def auth_off() -> None:
            found = await off_cache.current()
            assert not found

        async def auth_on() -> None:
            principal: Principal = authenticate(await on_cache.current(), token)
            account = await limits.admit(client, principal, job.model_copy(), None)
            assert account is not None and account.buckets

        admitted = await limits.admit(
            client, authenticate(await on_cache.current(), token), job, None
        )
        assert admitted is not None

        async def worker_settle() -> None:
            # What the worker does once a job ends: off the API's path, but
            # on the same cores and the same Redis.
            settle(sync, admitted, 150)

        steps: tuple[tuple[str, Step], ...] = (
            ("A", auth_off),
            ("B", auth_on),
            ("W", worker_settle),
        )
        rounds: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in steps}
        for _ in range(args.pairs):
            for label, step in steps:
                await _time(step, args.calls // 10)  # warm-up
                rounds[label].append(_stats(await _time(step, args.calls)))
        off_db.dispose()
        on_db.dispose()
    await client.aclose()
    sync.close()
    lines = [
        f"{args.pairs} rounds A B W of {args.calls} calls each; A = auth off "
        "(KeyCache.current), B = auth on with a limited key (KeyCache.current, "
        "authenticate, limits.admit on rpm + tpm + a quota window), W = the worker's "
        "settle of one job (ratelimit.settle)",
        "",
        "| system | median us per round | median (range) | p99 us per round |",
        "| --- | --- | --- | --- |",
    ]
    for label, stats in rounds.items():
        medians = [m for m, _ in stats]
        lines.append(
            f"| {label} | {' / '.join(f'{m:.0f}' for m in medians)} "
            f"| {statistics.median(medians):.0f} ({min(medians):.0f}-{max(medians):.0f}) "
            f"| {' / '.join(f'{p:.0f}' for _, p in stats)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    print(asyncio.run(run(parser.parse_args())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
