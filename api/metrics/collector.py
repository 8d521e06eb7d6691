"""The fleet's figures, read from Redis when /metrics is scraped: the
workers' heartbeats (keys.WORKERS, with their engines' counters,
schemas/worker_stats.py) and the length of every model's queues.

The reads are asynchronous and happen first (`gather`: one HGETALL, one
pipeline of LLENs); rendering (`FleetCollector`, for prometheus_client's
synchronous generate_latest) then only does arithmetic on what was read.
Nothing here runs unless a scraper asks: the serving path pays nothing.

llama.cpp's server names (`llamacpp:*`) are summed over every live worker of
each model, labelled `model`. Counters are each live worker's own since it
started, so a worker that stops takes its share with it: Prometheus' rate()
reads the drop as a counter reset."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from schemas import keys
from schemas.worker_stats import FIELD, WorkStats

# Celery's Redis transport keeps each priority step of a queue in a list of
# its own: the queue itself for step 0, `<queue>\x06\x16<step>` for the
# others (kombu's default steps 0, 3, 6, 9).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
QUEUES = {"interactive": keys.model_queue, "bulk": keys.bulk_queue}


def priority_list(queue: str, step: int) -> str:
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


@dataclass(frozen=True, slots=True)
class Worker:
    model: str
    slots: int
    # None: the worker sends no stats (an older version) or unreadable ones.
    stats: WorkStats | None


@dataclass
class Scrape:
    """What one scrape read: the live workers, every model known (configured
    or served) and each queue list's length by (model, queue, step)."""

    workers: list[Worker] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    queues: dict[tuple[str, str, int], int] = field(default_factory=dict)
    redis_up: bool = True


def live_workers(values: Iterable[bytes | str], now: float) -> list[Worker]:
    """The heartbeat entries not expired; a malformed one is skipped."""
    workers = []
    for value in values:
        try:
            info = json.loads(value)
            if float(info.get("expires_at", 0)) <= now:
                continue
            stats = WorkStats.from_json(info.get(FIELD))
            workers.append(Worker(str(info["model"]), int(info.get("slots", 1)), stats))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return workers


async def gather(client: aioredis.Redis, configured: Collection[str]) -> Scrape:
    """Read the fleet's state (two Redis round trips)."""
    raw = await client.hgetall(keys.WORKERS)
    workers = live_workers(raw.values(), time.time())
    models = sorted(set(configured) | {w.model for w in workers})
    names = [
        (model, kind, step, priority_list(queue(model), step))
        for model in models
        for kind, queue in QUEUES.items()
        for step in PRIORITY_STEPS
    ]
    async with client.pipeline(transaction=False) as pipe:
        for *_, name in names:
            pipe.llen(name)
        lengths = await pipe.execute()
    queues = {
        (model, kind, step): int(length)
        for (model, kind, step, _), length in zip(names, lengths, strict=True)
    }
    return Scrape(workers, models, queues)


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def _counter(name: str, help_text: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, labels=["model"])


def _gauge(name: str, help_text: str, labels: tuple[str, ...] = ("model",)) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, labels=list(labels))


class FleetCollector:
    """A prometheus_client collector of one Scrape (generate_latest(it))."""

    def __init__(self, scrape: Scrape) -> None:
        self.scrape = scrape

    def collect(self) -> Iterator[Metric]:
        scrape = self.scrape
        up = _gauge("inferq_redis_up", "1 when this scrape could read Redis.", ())
        up.add_metric([], 1.0 if scrape.redis_up else 0.0)
        yield up
        if not scrape.redis_up:
            return
        sums = self._sums()
        yield from self._llamacpp(sums)
        yield from self._inferq(sums)

    def _sums(self) -> dict[str, WorkStats]:
        sums: dict[str, WorkStats] = {}
        for worker in self.scrape.workers:
            if worker.stats is not None:
                sums[worker.model] = sums.get(worker.model, WorkStats()) + worker.stats
        return sums

    def _llamacpp(self, sums: dict[str, WorkStats]) -> Iterator[Metric]:
        """llama.cpp's names and types, with one exception: its
        n_busy_slots_per_decode is an average, a gauge here (a counter
        would have to be called ..._total)."""
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "prompt_tokens": _counter(
                "llamacpp:prompt_tokens_total", "Number of prompt tokens processed."
            ),
            "prompt_seconds": _counter("llamacpp:prompt_seconds_total", "Prompt process time"),
            "predicted": _counter(
                "llamacpp:tokens_predicted_total", "Number of generation tokens processed."
            ),
            "predicted_seconds": _counter(
                "llamacpp:tokens_predicted_seconds_total", "Predict process time"
            ),
            "decodes": _counter("llamacpp:n_decode_total", "Total number of llama_decode() calls"),
            "busy": _gauge(
                "llamacpp:n_busy_slots_per_decode",
                "Average number of busy slots per llama_decode() call",
            ),
            "prompt_rate": _gauge(
                "llamacpp:prompt_tokens_seconds",
                "Average prompt throughput in tokens/s (per sequence, over the last minute).",
            ),
            "predicted_rate": _gauge(
                "llamacpp:predicted_tokens_seconds",
                "Average generation throughput in tokens/s (per sequence, over the last minute).",
            ),
            "kv_ratio": _gauge(
                "llamacpp:kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage."
            ),
            "kv_tokens": _gauge("llamacpp:kv_cache_tokens", "KV-cache tokens."),
            "processing": _gauge("llamacpp:requests_processing", "Number of requests processing."),
            "deferred": _gauge("llamacpp:requests_deferred", "Number of requests deferred."),
        }
        for model, s in sorted(sums.items()):
            values = {
                "prompt_tokens": s.prompt_tokens,
                "prompt_seconds": s.prompt_seconds,
                "predicted": s.predicted_tokens,
                "predicted_seconds": s.predicted_seconds,
                "decodes": s.decodes,
                "busy": _ratio(s.busy_slots, max(s.decodes, 1)),
                "prompt_rate": _ratio(s.recent_prompt_tokens, s.recent_prompt_seconds),
                "predicted_rate": _ratio(s.recent_predicted_tokens, s.recent_predicted_seconds),
                "kv_ratio": _ratio(s.kv_tokens, s.kv_capacity),
                "kv_tokens": s.kv_tokens,
                "processing": s.processing,
                "deferred": s.deferred,
            }
            for key, family in families.items():
                family.add_metric([model], float(values[key]))
        yield from families.values()

    def _inferq(self, sums: dict[str, WorkStats]) -> Iterator[Metric]:
        scrape = self.scrape
        alive = _gauge("inferq_workers_alive", "Workers whose heartbeat is fresh.")
        slots = _gauge("inferq_worker_slots", "Generation slots of the live workers.")
        for model in scrape.models:
            mine = [w for w in scrape.workers if w.model == model]
            alive.add_metric([model], float(len(mine)))
            slots.add_metric([model], float(sum(w.slots for w in mine)))
        yield alive
        yield slots
        depth = _gauge(
            "inferq_queue_depth",
            "Jobs waiting in a model's queue (interactive requests or bulk chunks), "
            "by Celery priority step.",
            ("model", "queue", "priority"),
        )
        for (model, kind, step), length in sorted(scrape.queues.items()):
            depth.add_metric([model, kind, str(step)], float(length))
        yield depth
        lines = CounterMetricFamily(
            "inferq_batch_lines_total",
            "Batch line results written by the live workers, by state.",
            labels=["model", "state"],
        )
        for model, s in sorted(sums.items()):
            for state, count in (
                ("done", s.lines_done),
                ("failed", s.lines_failed),
                ("cancelled", s.lines_cancelled),
            ):
                lines.add_metric([model, state], float(count))
        yield lines
