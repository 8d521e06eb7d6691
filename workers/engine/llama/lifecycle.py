"""How requests end when the engine thread cannot end them itself: bounded
waits, expiry and abandonment. Every request handed to an engine ends with
exactly one terminal event (EngineRequest.settle), and no caller waits on it
without a bound."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from schemas.events import Done, ErrorEvent, encode
from workers.engine.types import (
    EXPIRE_GRACE_S,
    EngineRequest,
    EventSink,
    time_budget,
)

if TYPE_CHECKING:
    from workers.engine.llama.engine import LlamaEngine

log = logging.getLogger("inferq.engine")

SHUTTING_DOWN = "worker shutting down"


def error(message: str, status: int = 500) -> ErrorEvent:
    if status == 504:
        return ErrorEvent(message=message, status=504, code="timeout")
    return ErrorEvent(message=message, status=status)


def abandon(sink: EventSink, requests: list[EngineRequest], message: str, status: int) -> None:
    """End requests from outside the engine thread (which cannot, or is gone)."""
    for request in dict.fromkeys(requests):
        event = error(message, status)
        if not request.settle(event):
            continue
        if request.publish:
            try:
                sink.publish([(request.request_id, encode(event))])
            except Exception:
                log.exception("publishing the end of %s failed", request.request_id)
        request.finished.set()


def wait_bounded(
    engine: LlamaEngine,
    request: EngineRequest,
    *,
    queue_timeout: float,
    prompt_token_s: float,
    token_s: float,
) -> Done | ErrorEvent:
    """See LlamaEngine.wait."""
    budget = time_budget(
        request,
        queue_timeout=queue_timeout,
        n_ctx=engine.n_ctx_per_slot,
        prompt_token_s=prompt_token_s,
        token_s=token_s,
    )
    if not request.finished.wait(budget):
        log.warning("request %s ran past its %.0f s budget", request.request_id, budget)
        engine.expire(request, f"the request did not finish within its {budget:.0f} s budget")
        if not request.finished.wait(EXPIRE_GRACE_S):
            log.error("the engine did not end request %s: ending it here", request.request_id)
            abandon(engine.sink, [request], request.expired or "timed out", 504)
    result = request.result
    assert result is not None  # set before `finished`, or by abandon()
    return result
