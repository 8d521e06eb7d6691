"""What the API and the workers share about API keys: the quota rules a key
carries, and the account a job is charged to."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MINUTE = 60
# Quota windows reach from a minute to 30 days (LocalAI's QuotaRule range).
MAX_WINDOW = 30 * 24 * 3600


class QuotaRule(BaseModel):
    """At most `max_requests` requests and `max_tokens` tokens per `window`
    seconds on `model` (None: every model), counted per key as a bucket that
    refills continuously over the window."""

    model_config = ConfigDict(extra="forbid")

    # A model name (it becomes part of a Redis key, so bounded like one).
    model: str | None = Field(default=None, min_length=1, max_length=255)
    window: int = Field(ge=MINUTE, le=MAX_WINDOW)
    max_requests: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)


class JobAccount(BaseModel):
    """Who a job is charged to. `buckets` are the Redis token buckets its
    admission reserved `reserved_tokens` from (schemas.ratelimit); the
    worker settles them with what the job really used."""

    model_config = ConfigDict(extra="forbid")

    key_id: str
    reserved_tokens: int = Field(default=0, ge=0)
    buckets: list[str] = Field(default_factory=list)
