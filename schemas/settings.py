"""One settings class for every inferq process, read from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_URL = "sqlite:///./data/inferq.db"


def normalize_database_url(url: str) -> str:
    """Map plain `postgresql://` URLs onto the psycopg 3 driver inferq ships."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    # REDIS_URL / DATABASE_URL are the names every hosting platform uses;
    # the INFERQ_ forms are accepted too.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "INFERQ_REDIS_URL"),
    )
    database_url: str = Field(
        default=DEFAULT_SQLITE_URL,
        validation_alias=AliasChoices("DATABASE_URL", "INFERQ_DATABASE_URL"),
    )
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    # The Python of the vLLM workers' environment (`./run vllm`), which
    # `inferq up` starts a `backend: vllm` model's worker with. None: the
    # .venv-vllm beside this checkout, where there is one.
    vllm_python: Path | None = None
    # The niceness of a vLLM engine's processes on a CPU (workers/vllm_runtime.py):
    # 0 gives the engine the CPU on equal terms with Redis and the API.
    vllm_cpu_nice: int = Field(default=10, ge=0, le=19)
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    # How long an interactive request may wait for a worker to take it (until
    # the worker accepts it) before a 504; queued jobs older than this are
    # dropped by the worker (Celery expires). A job a worker accepted is bounded
    # by its token budget and by that worker's heartbeat, not by this.
    request_timeout: float = 600.0
    # A quiet SSE stream gets a comment line this often, so proxies and clients
    # do not time it out while a job waits or a long prompt is evaluated.
    sse_ping_interval: float = Field(default=15.0, gt=0)
    # Redis visibility timeout: an unacknowledged job is redelivered after this
    # long, so it must exceed the longest job (bulk jobs included).
    visibility_timeout: int = 6 * 3600
    # Worker heartbeat period; a worker silent for 3 periods is dead: the API
    # ends its requests (503 worker_lost), or queues again those whose client
    # got nothing yet.
    heartbeat_interval: float = Field(default=1.0, gt=0)
    # Seconds after the API starts during which a model without a live worker
    # is still waited for (its workers are loading); afterwards such a model
    # answers 503 model_unavailable at once.
    worker_start_grace: float = Field(default=10.0, ge=0)
    # Seconds a Redis connect or command may take (API and workers); with Redis
    # down, requests answer 503 within about this long.
    redis_timeout: float = Field(default=3.0, gt=0)
    # API keys (api/accounts/): "auto" asks for a key as soon as one exists
    # (none: the single-user embedded default, open); "required" always does
    # (the compose default), so an empty key table locks every route.
    auth: Literal["auto", "required"] = "auto"
    # POST /props (llama-server's --props): off, it answers 403; on, it sets
    # the defaults of /completion and /infill (shared through Redis).
    props_writable: bool = False
    # Files API: the largest upload accepted (OpenAI's limit for batch input).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    # The API edge (api/middleware.py, api/streaming/limits.py,
    # api/streaming/backpressure.py). The largest request body (file uploads
    # have max_file_bytes); 413 past it.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # Per request: chat messages, stop strings (and characters in each), and
    # embedding inputs or rerank documents.
    max_messages: int = Field(default=2048, gt=0)
    max_stop: int = Field(default=16, ge=0)
    max_stop_length: int = Field(default=512, gt=0)
    max_embedding_inputs: int = Field(default=2048, gt=0)
    # Backpressure: interactive jobs waiting in a model's queue beyond this
    # many per live worker slot (or beyond max_queue_depth when set) are
    # refused with a 503 and Retry-After; bulk lines never count.
    queue_depth_per_slot: int = Field(default=4, gt=0)
    max_queue_depth: int | None = Field(default=None, gt=0)
    # Browser origins allowed to call the API (CORS), comma-separated; `*`
    # for any; empty: none (closed).
    cors_origins: str = ""
    # The model llama-server's model-less routes (/completion, /tokenize,
    # /props, ...) use; unset: the first text-generation model.
    default_model: str | None = None
    # Bulk jobs. The batch scheduler (validation, feeding, lease recovery,
    # finalization) runs in the API process unless switched off; replicas
    # elect one leader through Redis.
    batch_scheduler: bool = True
    # How often the scheduler looks at running batches (seconds).
    batch_tick: float = Field(default=1.0, gt=0)
    # Lines per bulk-queue message, and how many lines per worker slot may be
    # queued or running at once (the rest wait in the database).
    batch_chunk_lines: int = Field(default=16, gt=0)
    batch_inflight_per_slot: int = Field(default=4, gt=0)
    # A queued or running line whose lease ran out (its worker or its queue
    # message was lost) goes back to pending; workers renew the leases of the
    # lines they hold every third of this.
    batch_lease: float = Field(default=60.0, gt=0)
    # A line lost this many times fails instead of running again.
    batch_max_attempts: int = Field(default=3, gt=0)
    # Usage rows waiting in a worker's memory for the database (written in
    # the background; past this many, during a long outage, the oldest go).
    usage_buffer: int = Field(default=100_000, gt=0)

    @field_validator("database_url")
    @classmethod
    def _normalize_db(cls, value: str) -> str:
        return normalize_database_url(value)


@lru_cache
def get_settings() -> Settings:
    return Settings()
