"""The bodies of GET /v1/usage, modelled on OpenAI's organization usage API
(`/v1/organization/usage/completions`): a page of time buckets, each with
one result per group. Its field names are OpenAI's, so a dashboard written
for OpenAI's usage API reads inferq's; `total_tokens` and `endpoint` are
inferq's own additions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class UsageResult(BaseModel):
    """The sums of one group. A field the query did not group by is null."""

    object: Literal["usage.result"] = "usage.result"
    model: str | None = None
    # The key the requests were made with (null: made while auth was off).
    api_key_id: str | None = None
    endpoint: str | None = None
    num_model_requests: int = 0
    input_tokens: int = 0
    # Prompt tokens served from the KV cache instead of evaluated (part of
    # input_tokens).
    input_cached_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class UsageBucket(BaseModel):
    """[start_time, end_time) in unix seconds: a UTC day when grouped by
    day, else the whole range asked for."""

    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageResult]


class UsagePage(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    # Every bucket is on this page (kept for clients of OpenAI's shape).
    has_more: bool = False
    next_page: str | None = None
