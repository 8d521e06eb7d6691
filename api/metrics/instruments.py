"""The API process's own instruments, in prometheus_client's default
registry (GET /metrics renders it beside the fleet's figures read from
Redis, api/metrics/collector.py).

What they cost the serving path: one histogram observation and one counter
increment when a job's stream ends, and one counter increment per HTTP
response. Nothing per token. Each API process counts what it served, so
Prometheus should scrape every replica (sum them in the query)."""

from __future__ import annotations

import time
from typing import Protocol

from prometheus_client import Counter, Histogram, disable_created_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.events import Done, Embeddings, ErrorEvent, Event
from schemas.jobs import EmbedJob, GenerateJob

# A `<name>_created` series beside every counter and histogram doubles the
# output for a figure nobody charts.
disable_created_metrics()  # type: ignore[no-untyped-call]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)

TIME_TO_FIRST_TOKEN = Histogram(
    "inferq_time_to_first_token_seconds",
    "From the API queueing a generation job to its first token reaching it "
    "(non-streamed requests: when it would have).",
    ["model"],
    buckets=TTFT_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "inferq_request_duration_seconds",
    "From the API queueing a job (generation, embeddings, rerank) to its end.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "inferq_requests",
    "Jobs run for HTTP requests, by how they ended: completed, failed "
    "(an error, a timeout, a lost worker) or cancelled (the client left).",
    ["model", "endpoint", "status"],
)
HTTP_RESPONSES = Counter(
    "inferq_http_responses",
    "HTTP responses by status class (2xx, 4xx, 5xx, ...).",
    ["code"],
)
# The rate limiter's refusals: kind is "requests", "tokens", "batch_tokens"
# (a batch over its allowance at create) or "quota" (a per-model window).
RATE_LIMITED = Counter(
    "inferq_rate_limited",
    "Requests refused with 429 by a key's rate limits or quotas.",
    ["kind"],
)

COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"


class EndedJob(Protocol):
    """What api/streaming/jobs.JobStream knows when a job's stream closes."""

    @property
    def job(self) -> GenerateJob | EmbedJob: ...

    @property
    def started(self) -> float: ...

    @property
    def first_token_at(self) -> float | None: ...

    @property
    def end(self) -> Event | None: ...

    @property
    def left(self) -> bool: ...


def status_of(end: Event | None, *, left: bool) -> str:
    if isinstance(end, Done):
        if end.choices and all(c.finish_reason == "cancelled" for c in end.choices):
            return CANCELLED
        return COMPLETED
    if isinstance(end, Embeddings):
        return COMPLETED
    if isinstance(end, ErrorEvent) or not left:
        # No end read and the client still there: the API ended the stream
        # with an error of its own (a timeout, Redis gone).
        return FAILED
    return CANCELLED


def job_ended(stream: EndedJob) -> None:
    """Count and time a job whose stream is closing (JobRunner.run)."""
    now = time.monotonic()
    job, end = stream.job, stream.end
    model = job.model
    endpoint = job.endpoint if isinstance(job, GenerateJob) else job.kind
    REQUESTS.labels(model=model, endpoint=endpoint, status=status_of(end, left=stream.left)).inc()
    if end is None or isinstance(end, ErrorEvent):
        return
    elapsed = now - stream.started
    REQUEST_DURATION.labels(model=model).observe(elapsed)
    ttft: float | None = None
    if stream.first_token_at is not None:
        ttft = stream.first_token_at - stream.started
    elif isinstance(end, Done) and end.ttft_ms is not None:
        # Not streamed: the whole answer came at once. Its first token was
        # ready the worker's generation time before the end arrived.
        ttft = max(0.0, elapsed - max(0.0, end.duration_ms - end.ttft_ms) / 1000)
    if ttft is not None:
        TIME_TO_FIRST_TOKEN.labels(model=model).observe(ttft)


class CountResponses:
    """ASGI middleware: inferq_http_responses_total by status class. It looks
    at the response's start message only; body chunks pass straight on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._classes = {n: HTTP_RESPONSES.labels(code=f"{n}xx") for n in range(1, 6)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        classes = self._classes

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                counter = classes.get(message["status"] // 100)
                if counter is not None:
                    counter.inc()
            await send(message)

        await self.app(scope, receive, counted)
