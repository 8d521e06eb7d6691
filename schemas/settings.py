"""One settings class for every inferq process, read from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    # How long the API waits on an interactive request before giving up with a
    # 504; queued jobs older than this are dropped by the worker (Celery expires).
    request_timeout: float = 600.0
    # A quiet SSE stream gets a comment line this often, so proxies and clients
    # do not time it out while a job waits or a long prompt is evaluated.
    sse_ping_interval: float = Field(default=15.0, gt=0)
    # Redis visibility timeout: an unacknowledged job is redelivered after this
    # long, so it must exceed the longest job (bulk jobs included).
    visibility_timeout: int = 6 * 3600
    # Worker heartbeat period; /health treats a worker silent for 3 periods as gone.
    heartbeat_interval: float = 5.0
    # POST /props (llama-server's --props): off, it answers 403; on, it sets
    # the defaults of /completion and /infill (shared through Redis).
    props_writable: bool = False
    # Files API: the largest upload accepted (OpenAI's limit for batch input).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
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

    @field_validator("database_url")
    @classmethod
    def _normalize_db(cls, value: str) -> str:
        return normalize_database_url(value)


@lru_cache
def get_settings() -> Settings:
    return Settings()
