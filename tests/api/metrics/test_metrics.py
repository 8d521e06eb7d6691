"""GET /metrics against the session stack (auth off): it parses as Prometheus
text, carries llama.cpp's names for the served model, and its counters move
with the traffic the test sends."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from schemas import keys
from schemas.heartbeats import read_beats
from schemas.queue import make_celery
from schemas.settings import Settings
from tests.support.batches import chat_line, submit, wait
from tests.support.stack import MODEL, Stack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

LLAMACPP = {
    # name: type, as llama-server declares them (n_busy_slots_per_decode,
    # an average, is a gauge here).
    "llamacpp:prompt_tokens_total": "counter",
    "llamacpp:prompt_seconds_total": "counter",
    "llamacpp:tokens_predicted_total": "counter",
    "llamacpp:tokens_predicted_seconds_total": "counter",
    "llamacpp:n_decode_total": "counter",
    "llamacpp:n_busy_slots_per_decode": "gauge",
    "llamacpp:prompt_tokens_seconds": "gauge",
    "llamacpp:predicted_tokens_seconds": "gauge",
    "llamacpp:kv_cache_usage_ratio": "gauge",
    "llamacpp:kv_cache_tokens": "gauge",
    "llamacpp:requests_processing": "gauge",
    "llamacpp:requests_deferred": "gauge",
}


def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels); the type of every family, by its name
    and by each of its sample names (a family may have no sample yet)."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
            types[sample.name] = family.type
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def until(url: str, condition: Callable[[Samples], bool], timeout: float = 20) -> Samples:
    """Scrape until `condition` holds (worker figures come with its next
    heartbeat, a second at most)."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = scrape(url)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, "the metrics did not get there"
        time.sleep(0.2)


def test_metrics_parse_and_name_the_fleet(stack: Stack) -> None:
    samples, types = scrape(stack.url)
    for name, kind in LLAMACPP.items():
        assert types.get(name) == kind, name
        assert (name, frozenset({("model", MODEL)})) in samples, name
    # The workers the heartbeats say are alive (the session's one, unless a
    # test before this one started more).
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        beats = [b for b in read_beats(client.hvals(keys.WORKERS)) if b.alive(time.time())]
    finally:
        client.close()
    mine = [b for b in beats if b.model == MODEL]
    assert len(mine) >= 1
    assert value(samples, "inferq_workers_alive", model=MODEL) == len(mine)
    assert value(samples, "inferq_worker_slots", model=MODEL) == sum(b.slots for b in mine)
    # The configured model nobody serves: known, no worker, no llama.cpp figures.
    assert ("inferq_workers_alive", frozenset({("model", "other")})) in samples
    assert value(samples, "inferq_workers_alive", model="other") == 0
    assert ("llamacpp:n_decode_total", frozenset({("model", "other")})) not in samples
    for queue in ("interactive", "bulk"):
        for step in ("0", "3", "6", "9"):
            key = (
                "inferq_queue_depth",
                frozenset({("model", MODEL), ("queue", queue), ("priority", step)}),
            )
            assert key in samples and samples[key] >= 0
    assert value(samples, "inferq_redis_up") == 1
    # Declared even before the rate limiter refused anything.
    assert types["inferq_rate_limited"] == "counter"
    assert types["inferq_batch_lines"] == "counter"
    assert types["inferq_time_to_first_token_seconds"] == "histogram"
    assert types["inferq_request_duration_seconds"] == "histogram"
    kv = value(samples, "llamacpp:kv_cache_usage_ratio", model=MODEL)
    assert 0 <= kv <= 1


def test_counters_move_with_completions(stack: Stack) -> None:
    client = stack.client()
    before, _ = scrape(stack.url)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "metrics, not streamed"}],
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "metrics, streamed"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    streamed = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert whole.usage is not None and len(streamed) == 1 and streamed[0] is not None
    completion = whole.usage.completion_tokens + streamed[0].completion_tokens
    assert completion == 24
    m = {"model": MODEL}
    predicted = "llamacpp:tokens_predicted_total"
    after = until(
        stack.url, lambda s: value(s, predicted, **m) >= value(before, predicted, **m) + completion
    )

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("llamacpp:prompt_tokens_total", **m) > 0
    assert grew("llamacpp:tokens_predicted_seconds_total", **m) > 0
    assert grew("llamacpp:prompt_seconds_total", **m) > 0
    assert grew("llamacpp:n_decode_total", **m) >= 12
    assert value(after, "llamacpp:n_busy_slots_per_decode", **m) >= 1
    # Throughput over the last minute, which holds these requests.
    assert value(after, "llamacpp:predicted_tokens_seconds", **m) > 0
    assert value(after, "llamacpp:prompt_tokens_seconds", **m) > 0
    assert value(after, "llamacpp:kv_cache_tokens", **m) > 0
    # Observed by the API when each stream ended: both requests, TTFT within
    # the request's whole duration.
    assert grew("inferq_time_to_first_token_seconds_count", **m) >= 2
    assert grew("inferq_request_duration_seconds_count", **m) >= 2
    ttft = grew("inferq_time_to_first_token_seconds_sum", **m)
    assert 0 < ttft <= grew("inferq_request_duration_seconds_sum", **m)
    completed = {"model": MODEL, "endpoint": "chat.completions", "status": "completed"}
    assert grew("inferq_requests_total", **completed) >= 2
    assert grew("inferq_http_responses_total", code="2xx") >= 2


def test_failed_and_cancelled_requests_are_counted(stack: Stack) -> None:
    before, _ = scrape(stack.url)
    # The worker refuses a prompt longer than the context: a failed job.
    too_long = httpx.post(
        stack.url + "/v1/completions",
        json={"model": MODEL, "prompt": "long " * 3000, "max_tokens": 4},
        timeout=60,
    )
    assert too_long.status_code == 400
    # A client that leaves after the first chunk: a cancelled job.
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            stack.url + "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "go on",
                "max_tokens": 2000,
                "stream": True,
                "ignore_eos": True,
            },
        ) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())
    unknown = httpx.post(
        stack.url + "/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=30
    )
    assert unknown.status_code == 404
    labels = {"model": MODEL, "endpoint": "completions"}
    after = until(
        stack.url,
        lambda s: (
            value(s, "inferq_requests_total", **labels, status="cancelled")
            > value(before, "inferq_requests_total", **labels, status="cancelled")
        ),
    )
    assert value(after, "inferq_requests_total", **labels, status="failed") >= (
        value(before, "inferq_requests_total", **labels, status="failed") + 1
    )
    assert value(after, "inferq_http_responses_total", code="4xx") >= (
        value(before, "inferq_http_responses_total", code="4xx") + 2
    )


def test_batch_lines_are_counted_by_state(stack: Stack) -> None:
    client = stack.client()
    before, _ = scrape(stack.url)
    lines = [chat_line(f"m{i}", f"metrics line {i}", max_tokens=4) for i in range(3)]
    # Refused by the worker (the context does not fit): a failed line.
    lines.append(chat_line("toolong", "long " * 3000, max_tokens=4))
    batch = wait(client, submit(client, lines).id, 120)
    assert batch.status == "completed", batch
    m = {"model": MODEL}

    def lines_of(s: Samples, state: str) -> float:
        return value(s, "inferq_batch_lines_total", **m, state=state)

    counts = batch.request_counts
    assert counts is not None and (counts.completed, counts.failed) == (3, 1)
    # The worker's counts, with its next heartbeat (other tests' batches
    # finishing meanwhile may add to them, never take away).
    until(
        stack.url,
        lambda s: (
            lines_of(s, "done") >= lines_of(before, "done") + 3
            and lines_of(s, "failed") >= lines_of(before, "failed") + 1
        ),
    )


def test_queue_depth_counts_jobs_waiting_at_their_priority(stack: Stack) -> None:
    # `other` has no worker: what Celery queues for it stays in Redis.
    celery = make_celery(Settings(redis_url=stack.env["REDIS_URL"]), name="metrics-test")
    queue = keys.model_queue("other")
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        for priority in (0, 0, 3):
            celery.send_task(keys.TASK_GENERATE, args=[{}], queue=queue, priority=priority)
        samples, _ = scrape(stack.url)

        def depth(kind: str, step: str) -> float:
            return value(samples, "inferq_queue_depth", model="other", queue=kind, priority=step)

        assert (depth("interactive", "0"), depth("interactive", "3")) == (2, 1)
        assert depth("interactive", "6") == depth("bulk", "0") == 0
    finally:
        client.delete(queue, f"{queue}\x06\x163")
        client.close()
        celery.close()
