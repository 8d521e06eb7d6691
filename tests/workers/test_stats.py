"""A worker's heartbeat stats: its engines' figures, its batch lines and the
last minute's throughput counters, written into its keys.WORKERS entry."""

from __future__ import annotations

import json

import redis

from schemas import keys
from schemas.heartbeats import read_beats
from schemas.worker_stats import FIELD, WorkStats
from tests.workers.conftest import RecordingSink, run
from workers.engine.llama.engine import LlamaEngine
from workers.engine.types import Sampling
from workers.presence import Heartbeat
from workers.stats import StatsReporter

SHORT = Sampling(temperature=0.0, max_tokens=16, ignore_eos=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_figures_cover_the_last_minute(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, _ = engine
    clock = Clock()
    reporter = StatsReporter([eng], window=60, clock=clock)
    first = WorkStats.from_json(reporter())
    assert first is not None and first.recent_predicted_tokens == 0
    run(eng, ["hello world", "one two three"], SHORT)
    clock.now += 10
    busy = WorkStats.from_json(reporter())
    assert busy is not None
    assert busy.predicted_tokens - first.predicted_tokens == 32
    assert busy.recent_predicted_tokens == 32
    assert busy.recent_prompt_tokens == busy.prompt_tokens - first.prompt_tokens > 0
    assert busy.recent_predicted_seconds == busy.predicted_seconds - first.predicted_seconds > 0
    # 65 s after the first beat the window still reaches back to it (the
    # next point, at 10 s, is younger than a minute)...
    clock.now += 55
    still = WorkStats.from_json(reporter())
    assert still is not None and still.recent_predicted_tokens == 32
    # ...and once the busy beat is a minute old, nothing happened since it.
    clock.now += 10
    idle = WorkStats.from_json(reporter())
    assert idle is not None
    assert idle.recent_predicted_tokens == 0 and idle.recent_predicted_seconds == 0
    # The cumulative counters do not move with the window.
    assert idle.predicted_tokens == busy.predicted_tokens


class Broken:
    def metrics(self) -> WorkStats:
        raise RuntimeError("no figures")


def test_engines_and_lines_add_up_and_a_failure_yields_no_stats(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    run(eng, ["hello world"], SHORT)
    lines = {"done": 5, "failed": 2, "cancelled": 1}
    both = WorkStats.from_json(StatsReporter([eng, eng], lines=lambda: lines)())
    alone = eng.metrics()
    assert both is not None
    assert both.predicted_tokens == 2 * alone.predicted_tokens > 0
    assert (both.lines_done, both.lines_failed, both.lines_cancelled) == (5, 2, 1)
    # A heartbeat must go out even when an engine cannot be read.
    assert StatsReporter([Broken()])() == {}


def test_heartbeat_carries_the_stats_and_old_readers_still_read_it(
    engine: tuple[LlamaEngine, RecordingSink], other_redis_url: str
) -> None:
    eng, _ = engine
    run(eng, ["hello world"], SHORT)
    client = redis.Redis.from_url(other_redis_url)
    client.delete(keys.WORKERS)
    beat = Heartbeat(
        client,
        model="tiny",
        worker_id="w1",
        interval=5,
        slots=eng.n_slots,
        stats=StatsReporter([eng], lines=lambda: {"done": 3}),
    )
    beat.beat()
    try:
        raw = client.hget(keys.WORKERS, keys.worker_field("tiny", "w1"))
        assert raw is not None
        entry = json.loads(raw)
        stats = WorkStats.from_json(entry[FIELD])
        assert stats is not None
        assert stats.predicted_tokens == eng.metrics().predicted_tokens >= 16
        assert stats.kv_capacity == eng.n_slots * eng.n_ctx_per_slot
        assert stats.lines_done == 3
        # The entry's other readers see the same worker as before.
        [read] = read_beats([raw])
        assert (read.model, read.worker_id, read.slots) == ("tiny", "w1", eng.n_slots)
    finally:
        beat.stop()
    assert client.hlen(keys.WORKERS) == 0


def test_stats_from_an_older_or_a_broken_worker() -> None:
    assert WorkStats.from_json(None) is None
    assert WorkStats.from_json("12") is None
    assert WorkStats.from_json({"prompt_tokens": "many"}) is None
    assert WorkStats.from_json({"prompt_tokens": -1}) is None
    assert WorkStats.from_json({"prompt_seconds": float("nan")}) is None
    # Missing fields are 0, unknown ones ignored.
    stats = WorkStats.from_json({"prompt_tokens": 7, "from_the_future": 1})
    assert stats == WorkStats(prompt_tokens=7)
