"""How requests end when the engine thread cannot end them itself: bounded
waits, expiry and abandonment. Every request handed to an engine ends with
exactly one terminal event (EngineRequest.settle), and no caller waits on it
without a bound."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from schemas.events import ChoiceResult, Done, ErrorEvent, Usage, encode
from workers.engine.types import (
    EXPIRE_GRACE_S,
    EngineRequest,
    EventSink,
    time_budget,
)

log = logging.getLogger("inferq.engine")

SHUTTING_DOWN = "worker shutting down"


class EngineThread:
    """The one thread an engine runs on, the condition that wakes it, and the
    flag (read and written under that condition) that tells it to stop.
    Subclasses implement `_run` and start `_thread` once they are set up."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def _stop_thread(self, timeout: float = 30.0) -> bool:
        """Tell the engine thread to stop and wait for it; False when it is
        still running after `timeout` seconds."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()


class Expirable(Protocol):
    """What a bounded wait needs of the engine running the request."""

    @property
    def n_ctx_per_slot(self) -> int: ...

    @property
    def sink(self) -> EventSink: ...

    def expire(self, request: EngineRequest, reason: str) -> None: ...


def error(message: str, status: int = 500) -> ErrorEvent:
    if status == 504:
        return ErrorEvent(message=message, status=504, code="timeout")
    return ErrorEvent(message=message, status=status)


def cancelled_answer(request: EngineRequest, progress: Done | None = None) -> Done:
    """The answer of a cancelled request: every choice cancelled, with the
    usage and duration of what it ran (`progress`), if it started."""
    choices = [ChoiceResult(index=i, finish_reason="cancelled") for i in range(request.sampling.n)]
    if progress is None:
        return Done(choices=choices, usage=Usage(len(request.prompt_tokens), 0))
    return Done(choices, progress.usage, None, progress.duration_ms)


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
    engine: Expirable,
    request: EngineRequest,
    *,
    queue_timeout: float,
    prompt_token_s: float,
    token_s: float,
) -> Done | ErrorEvent:
    """An engine's `wait`: the result within the request's time budget
    (workers.engine.types.time_budget); past it the engine is asked to expire
    the request, and if it does not, the request is ended here (504)."""
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
