"""Bulk jobs (the OpenAI Batches API): what both the API and the workers read:
line states, batch statuses, endpoints, limits, and the shape of a line's job
and result."""

from __future__ import annotations

import re
from typing import Any, Literal

# The most lines one batch may hold (OpenAI's limit).
MAX_LINES = 50_000

# Endpoint a batch runs -> the kind of job its lines become.
ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/rerank": "rerank",
}

# Line states. pending: waiting in the database; queued: in a chunk on the
# bulk queue (leased); running: claimed by a worker (lease renewed while it
# lives); the rest are final.
PENDING = "pending"
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
EXPIRED = "expired"
LIVE_STATES = (PENDING, QUEUED, RUNNING)

# Batch statuses, as OpenAI names them.
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
BATCH_FAILED = "failed"
BATCH_EXPIRED = "expired"
CANCELLING = "cancelling"
BATCH_CANCELLED = "cancelled"
ACTIVE_STATUSES = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)

_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_SECONDS = 30 * 86400


def window_seconds(window: str) -> int:
    """`24h`, `1h`, `30m`, `90s`, `2d` -> seconds; ValueError otherwise."""
    match = _WINDOW.match(window)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(
            "completion_window must be a duration such as '24h', '1h' or '30m' "
            "(a number followed by s, m, h or d)"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_WINDOW_SECONDS:
        raise ValueError("completion_window may be at most 30d")
    return seconds


def line_job(
    task: Literal["generate", "embed"], payload: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """What `batch_lines.job` holds: the job a worker runs (a GenerateJob or an
    EmbedJob payload), and the request options the API needs to shape the
    response body afterwards."""
    return {"task": task, "payload": payload, "options": options}


def worker_result(event: dict[str, Any]) -> dict[str, Any]:
    """`batch_lines.result` for a line a worker ran: its final stream event
    (Done, Embeddings or error), shaped into a response body at finalization."""
    return {"event": event}


def http_result(status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """`batch_lines.result` for a line answered without a worker (rejected
    while validating): the response as it will appear in the output."""
    return {"status_code": status_code, "body": body}
