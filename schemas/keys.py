"""Every Redis key, pub/sub channel and Celery queue name inferq uses."""

from __future__ import annotations

PREFIX = "inferq"

# Celery task names (the worker registers them, the API sends by name).
TASK_GENERATE = "inferq.generate"
TASK_EMBED = "inferq.embed"
# A chunk of bulk lines (its id); the lines themselves live in the database.
TASK_BULK = "inferq.bulk"

# Hash: field "<model>|<worker id>" -> JSON WorkerInfo; refreshed by heartbeats.
WORKERS = f"{PREFIX}:workers"


def model_queue(model: str) -> str:
    """Celery queue of interactive jobs for one model."""
    return f"{PREFIX}.model.{model}"


def bulk_queue(model: str) -> str:
    """Celery queue of bulk-line chunks for one model: a worker runs them only
    in slots no interactive request is waiting for."""
    return f"{PREFIX}.bulk.{model}"


# Leader lock of the batch scheduler (one per deployment); value: holder id.
BATCH_SCHEDULER_LOCK = f"{PREFIX}:batch-scheduler"
# Announced on a model's cancel channel when a batch is cancelled or expires:
# workers drop that batch's lines that have not started.
BATCH_CANCEL_PREFIX = "batch:"


def batch_cancel_message(batch_id: str) -> str:
    """What goes on a model's cancel channel to cancel a batch's lines."""
    return BATCH_CANCEL_PREFIX + batch_id


def stream_channel(request_id: str) -> str:
    """Pub/sub channel a worker publishes a request's events on."""
    return f"{PREFIX}:stream:{request_id}"


def cancel_key(request_id: str) -> str:
    """Set when a client goes away, so a queued job never starts."""
    return f"{PREFIX}:cancelled:{request_id}"


def started_key(request_id: str) -> str:
    """Set (NX) by the worker that starts a job: a second copy of the message
    (Celery puts a running job's message back when the consumer loses its
    connection) finds it set and is dropped instead of run twice."""
    return f"{PREFIX}:started:{request_id}"


# The value of a cancel key whose job the API queued again under a new id (its
# worker died before the client got anything): a worker drops such a copy
# without a usage row.
CANCEL_REQUEUED = b"requeued"


def cancel_channel(model: str) -> str:
    """Pub/sub channel the API announces cancelled request ids on; every worker
    of the model listens and stops the request within one decode step."""
    return f"{PREFIX}:cancel:{model}"


def worker_field(model: str, worker_id: str) -> str:
    return f"{model}|{worker_id}"


def model_props(model: str) -> str:
    """JSON a worker writes when it starts: what llama-server's GET /props
    reports (context size, default generation settings, chat template)."""
    return f"{PREFIX}:props:{model}"


def props_overrides(model: str) -> str:
    """JSON of the /completion defaults set through POST /props."""
    return f"{PREFIX}:props-overrides:{model}"


# Bumped whenever an API key is created, changed or revoked: every API process
# reads it per request and reloads its keys when it moved.
API_KEYS_VERSION = f"{PREFIX}:api-keys:version"


def rate_bucket(key_id: str, name: str) -> str:
    """Hash of one token bucket of a key (schemas/ratelimit.py): `name` is
    "rpm", "tpm" or a quota window's own name."""
    return f"{PREFIX}:rate:{key_id}:{name}"
