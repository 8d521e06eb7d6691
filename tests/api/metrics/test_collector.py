"""The fleet's figures as a scrape reads them from a real Redis: llama.cpp's
names summed over the live workers of each model, ratios taken of the sums,
dead workers and unreadable entries left out."""

from __future__ import annotations

import asyncio
import json
import time

import redis
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics.collector import FleetCollector, gather
from schemas import keys
from schemas.worker_stats import WorkStats
from workers.presence import Heartbeat

A = WorkStats(
    prompt_tokens=100,
    prompt_seconds=0.5,
    predicted_tokens=40,
    predicted_seconds=2.0,
    decodes=40,
    busy_slots=80,
    kv_tokens=300,
    kv_capacity=1000,
    processing=2,
    deferred=1,
    lines_done=7,
    lines_failed=1,
    recent_prompt_tokens=100,
    recent_prompt_seconds=0.5,
    recent_predicted_tokens=40,
    recent_predicted_seconds=2.0,
)
B = WorkStats(
    prompt_tokens=50,
    prompt_seconds=0.5,
    predicted_tokens=60,
    predicted_seconds=1.0,
    decodes=10,
    busy_slots=10,
    kv_tokens=100,
    kv_capacity=1000,
    processing=1,
    lines_done=3,
    recent_predicted_tokens=60,
    recent_predicted_seconds=1.0,
)


def _render(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async def read() -> bytes:
        client = aioredis.Redis.from_url(url)
        try:
            return generate_latest(FleetCollector(await gather(client, ["m", "idle"])))
        finally:
            await client.aclose()

    text = asyncio.run(read()).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_live_workers_are_summed_per_model(other_redis_url: str) -> None:
    client = redis.Redis.from_url(other_redis_url)
    client.delete(keys.WORKERS)
    beats = [
        Heartbeat(client, model="m", worker_id=name, interval=5, slots=2, stats=stats.to_json)
        for name, stats in (("a", A), ("b", B))
    ]
    # An older worker (no stats), a dead one and a stray write.
    old = Heartbeat(client, model="m", worker_id="old", interval=5, slots=4)
    dead = {**A.to_json(), "processing": 50}
    client.hset(
        keys.WORKERS,
        mapping={
            keys.worker_field("m", "dead"): json.dumps(
                {
                    "model": "m",
                    "worker_id": "dead",
                    "slots": 2,
                    "expires_at": time.time() - 1,
                    "stats": dead,
                }
            ),
            "stray": "not json",
        },
    )
    for beat in [*beats, old]:
        beat.beat()
    try:
        s = _render(other_redis_url)
    finally:
        client.delete(keys.WORKERS)
        client.close()

    def v(name: str, **labels: str) -> float:
        return s[(name, frozenset({"model": "m", **labels}.items()))]

    assert v("inferq_workers_alive") == 3 and v("inferq_worker_slots") == 8
    assert s[("inferq_workers_alive", frozenset({("model", "idle")}))] == 0
    assert v("llamacpp:prompt_tokens_total") == 150
    assert v("llamacpp:prompt_seconds_total") == 1.0
    assert v("llamacpp:tokens_predicted_total") == 100
    assert v("llamacpp:tokens_predicted_seconds_total") == 3.0
    assert v("llamacpp:n_decode_total") == 50
    # Ratios of the sums, not sums of the ratios.
    assert v("llamacpp:n_busy_slots_per_decode") == 90 / 50
    assert v("llamacpp:kv_cache_tokens") == 400
    assert v("llamacpp:kv_cache_usage_ratio") == 400 / 2000
    assert v("llamacpp:prompt_tokens_seconds") == 100 / 0.5
    assert v("llamacpp:predicted_tokens_seconds") == 100 / 3.0
    assert v("llamacpp:requests_processing") == 3
    assert v("llamacpp:requests_deferred") == 1
    assert v("inferq_batch_lines_total", state="done") == 10
    assert v("inferq_batch_lines_total", state="failed") == 1
    # No live worker of `idle`: no llama.cpp figures for it.
    assert ("llamacpp:n_decode_total", frozenset({("model", "idle")})) not in s
