"""Usage rows: one per finished request, written off the engine thread."""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from schemas.tables import UsageRecord

log = logging.getLogger(__name__)


def record_usage(
    engine: Engine,
    *,
    request_id: str,
    model: str,
    endpoint: str,
    prompt_tokens: int,
    completion_tokens: int,
    ttft_ms: float | None,
    duration_ms: float,
    status: str,
    worker: str | None = None,
) -> None:
    try:
        with Session(engine) as session, session.begin():
            session.add(
                UsageRecord(
                    request_id=request_id,
                    model=model,
                    endpoint=endpoint,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    ttft_ms=ttft_ms,
                    duration_ms=duration_ms,
                    status=status,
                    worker=worker,
                )
            )
    except Exception:
        # Accounting must never fail the request it accounts for.
        log.exception("could not record usage for %s", request_id)
