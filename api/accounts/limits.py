"""Admission of a keyed caller's job against its key's limits: requests and
tokens per minute, and its quota windows (schemas.accounts.QuotaRule), as
token buckets in Redis (schemas/ratelimit.py) so every API replica counts
the same requests.

A job costs one request and its estimated tokens: the prompt's characters
divided by four (no tokenizer on the hot path) plus max_tokens x n when the
request gives max_tokens. Each token bucket is charged that estimate capped
at its capacity, so a request bigger than a whole bucket waits for a full
bucket instead of never passing. The worker settles the token buckets with
the real prompt and completion tokens when the job ends.

A key without rpm, tpm or quotas costs nothing here: no Redis call."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.accounts.principal import KeyInfo, Principal
from api.errors import APIError
from api.metrics.instruments import RATE_LIMITED
from api.streaming.hub import redis_unavailable
from schemas import keys, ratelimit
from schemas.accounts import MINUTE, JobAccount
from schemas.jobs import EmbedJob, GenerateJob
from schemas.ratelimit import Bucket, BucketState

log = logging.getLogger(__name__)

Kind = Literal["requests", "tokens"]

# The prompt estimate: characters per token (OpenAI's rule of thumb for
# English); a token id given as such counts as one token.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Limit:
    """One bucket a job draws from, with what a refusal says about it."""

    kind: Kind
    label: str
    bucket: Bucket
    # The refusal counter's label (api/metrics): "requests", "tokens", "quota".
    metric: str


def has_limits(key: KeyInfo | None) -> bool:
    return key is not None and (key.rpm is not None or key.tpm is not None or bool(key.quotas))


# -- the estimate ---------------------------------------------------------------


def text_chars(value: Any) -> int:
    """Characters of the text in `value` (strings in lists and dicts); a
    token id counts as CHARS_PER_TOKEN characters, i.e. one token."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return CHARS_PER_TOKEN
    if isinstance(value, Mapping):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value)
    return 0


def prompt_chars(job: GenerateJob | EmbedJob) -> int:
    if isinstance(job, EmbedJob):
        return text_chars(job.inputs) + text_chars(job.query) + text_chars(job.documents)
    total = text_chars(job.prompt) + text_chars(job.prompt_parts) + text_chars(job.tools)
    for m in job.messages or ():
        total += len(m.role) + len(m.content) + text_chars(m.tool_calls)
    if job.infill is not None:
        total += text_chars(job.infill.model_dump())
    return total


def estimate_tokens(job: GenerateJob | EmbedJob) -> int:
    """Prompt characters / 4, plus max_tokens x n when max_tokens is given."""
    tokens = math.ceil(prompt_chars(job) / CHARS_PER_TOKEN)
    if isinstance(job, GenerateJob) and job.sampling.max_tokens is not None:
        tokens += job.sampling.max_tokens * job.sampling.n
    return tokens


# -- the buckets ------------------------------------------------------------------


def window_text(seconds: int) -> str:
    """A quota window as people write it: 60 -> "1m", 86400 -> "1d"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def limits_for(key: KeyInfo, model: str, tokens: int) -> list[Limit]:
    """The buckets a job of `tokens` estimated tokens on `model` draws from:
    rpm and tpm first, then every quota rule for `model` or for all models.
    Rules of the same model, window and kind share one bucket at the
    tightest of their limits."""
    out: list[Limit] = []
    if key.rpm is not None:
        out.append(
            Limit(
                "requests",
                "requests per min (RPM)",
                _bucket(key, "rpm", key.rpm, MINUTE, 1),
                "requests",
            )
        )
    if key.tpm is not None:
        out.append(
            Limit(
                "tokens",
                "tokens per min (TPM)",
                _bucket(key, "tpm", key.tpm, MINUTE, tokens),
                "tokens",
            )
        )
    tightest: dict[tuple[str, int, Kind], int] = {}
    for rule in key.quotas:
        if rule.model is not None and rule.model != model:
            continue
        scope = rule.model or "*"
        pairs: tuple[tuple[Kind, int | None], ...] = (
            ("requests", rule.max_requests),
            ("tokens", rule.max_tokens),
        )
        for kind, cap in pairs:
            if cap is not None:
                slot = (scope, rule.window, kind)
                tightest[slot] = min(cap, tightest.get(slot, cap))
    for (scope, window, kind), cap in tightest.items():
        name = f"quota:{scope}:{window}:{kind}"
        on = "every model" if scope == "*" else f"model '{scope}'"
        label = f"{kind} per {window_text(window)} (quota on {on})"
        cost = 1 if kind == "requests" else tokens
        out.append(Limit(kind, label, _bucket(key, name, cap, window, cost), "quota"))
    return out


def _bucket(key: KeyInfo, name: str, capacity: int, period: int, cost: int) -> Bucket:
    return Bucket(keys.rate_bucket(key.id, name), capacity, float(period), min(cost, capacity))


# -- the answer -------------------------------------------------------------------


def duration(seconds: float) -> str:
    """OpenAI's duration format (Go's): "20ms", "1s", "1.5s", "6m0s", "2h0m0s"."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def headers_of(limits: Sequence[Limit], states: Sequence[BucketState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers. Of several buckets of a kind (rpm and
    a quota window), the one with the least left speaks: it is what decides
    the caller's next request."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        mine = [s for lim, s in zip(limits, states, strict=True) if lim.kind == kind]
        if not mine:
            continue
        # min() keeps the first of equals: rpm/tpm before the quota windows.
        state = min(mine, key=lambda s: s.remaining)
        out[f"x-ratelimit-limit-{kind}"] = str(state.bucket.capacity)
        out[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
        out[f"x-ratelimit-reset-{kind}"] = duration(state.reset)
    return out


def refusal(model: str, limit: Limit, state: BucketState, wait: float) -> APIError:
    retry_after = max(1, math.ceil(wait))
    return APIError(
        429,
        f"Rate limit reached for {model} on {limit.label}: Limit {limit.bucket.capacity}, "
        f"Used {state.used}, Requested {limit.bucket.cost}. "
        f"Please try again in {duration(wait)}.",
        code="rate_limit_exceeded",
        type=limit.kind,
        headers={"Retry-After": str(retry_after)},
    )


# -- admission ---------------------------------------------------------------------


async def admit(
    client: aioredis.Redis,
    principal: Principal,
    job: GenerateJob | EmbedJob,
    state: Any | None,
) -> JobAccount | None:
    """The account `job` is charged to, once its key's buckets admitted it
    (None while auth is off); a 429 `rate_limit_exceeded` with Retry-After
    when one is short. The x-ratelimit-* headers go to `state` (the request's
    state, which api/accounts/auth.py adds to the response)."""
    key = principal.key
    if key is None:
        return None
    if not has_limits(key):
        return JobAccount(key_id=key.id)
    tokens = estimate_tokens(job)
    limits = limits_for(key, job.model, tokens)
    try:
        admission = await ratelimit.admit(client, [lim.bucket for lim in limits])
    except (RedisError, OSError) as exc:
        # Limits that cannot be counted are not waived: the queue is in the
        # same Redis, so nothing could be enqueued anyway.
        raise redis_unavailable(exc) from exc
    if state is not None:
        state.ratelimit_headers = headers_of(limits, admission.states)
    if not admission.admitted:
        blocking = admission.blocking()
        assert blocking is not None
        limit = limits[admission.states.index(blocking)]
        RATE_LIMITED.labels(kind=limit.metric).inc()
        log.info("rate limit: refused a request on %s (%s)", job.model, limit.label)
        raise refusal(job.model, limit, blocking, admission.wait)
    return JobAccount(
        key_id=key.id,
        reserved_tokens=tokens,
        buckets=[lim.bucket.key for lim in limits if lim.kind == "tokens"],
    )


async def refund(client: aioredis.Redis, principal: Principal, job: GenerateJob | EmbedJob) -> None:
    """Give back what `admit` took for a job that was never enqueued (the
    queue was full, Redis failed under the send). Never raises."""
    key, account = principal.key, job.account
    if key is None or account is None or not has_limits(key):
        return
    requests = [
        lim.bucket.key
        for lim in limits_for(key, job.model, account.reserved_tokens)
        if lim.kind == "requests"
    ]
    try:
        await ratelimit.refund(client, requests, 1)
        await ratelimit.refund(client, account.buckets, account.reserved_tokens)
    except Exception as exc:
        log.warning("could not give back a refused job's rate-limit reservation: %s", exc)
