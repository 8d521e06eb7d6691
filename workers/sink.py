"""Publishes engine events on each request's pub/sub channel."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import redis

from schemas import keys
from schemas.events import ErrorEvent, encode

log = logging.getLogger(__name__)

# Told to a request whose events could not be published: its client may be
# missing tokens (or its end), so the stream must end rather than wait.
_LOST = encode(
    ErrorEvent(
        message="events of this request were lost while Redis was unreachable",
        error_type="server_error",
        code="events_lost",
        status=503,
    )
)


class RedisSink:
    """`on_orphan(request_id)` is called for a request whose event reached no
    subscriber (the API that asked for it is gone: crashed, or it ended the
    stream when its Redis connection dropped), and for a request whose events
    could not be published: either way it should stop. The API subscribes
    before it enqueues, so a live request always has a listener.

    A failed publish is not raised (the engine carries on); the requests it
    hit get an `events_lost` error once Redis answers again, on the next
    publish or `flush()` (the heartbeat calls it)."""

    def __init__(
        self, client: redis.Redis, *, on_orphan: Callable[[str], None] | None = None
    ) -> None:
        self._client = client
        self._on_orphan = on_orphan
        self._lock = threading.Lock()
        self._damaged: set[str] = set()

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
        with self._lock:
            notices = [(rid, _LOST) for rid in self._damaged]
            batch = [*notices, *events]
            # One round trip per engine step, whatever the number of sequences.
            pipe = self._client.pipeline(transaction=False)
            for request_id, payload in batch:
                pipe.publish(keys.stream_channel(request_id), payload)
            try:
                receivers = pipe.execute()
            except redis.RedisError as exc:
                hit = {rid for rid, _ in events} - self._damaged
                if not self._damaged:
                    log.warning("publishing events failed (%s); their requests stop", exc)
                self._damaged |= hit
                self._orphaned(hit)
                return
            if self._damaged:
                log.info("Redis answers again; %d requests told of lost events", len(notices))
            self._damaged.clear()
        # PUBLISH answers how many subscribers got the event: free to read.
        self._orphaned(
            {rid for (rid, _), n in zip(batch, receivers, strict=True) if n == 0}
            - {rid for rid, _ in notices}
        )

    def flush(self) -> None:
        """Deliver pending `events_lost` notices, if any."""
        if self._damaged:
            self.publish([])

    def _orphaned(self, request_ids: set[str]) -> None:
        if self._on_orphan is None:
            return
        for request_id in request_ids:
            try:
                self._on_orphan(request_id)
            except Exception:
                log.exception("stopping orphaned request %s failed", request_id)


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_request_error"
) -> ErrorEvent:
    """The 400 refusing a job, naming the request field at fault."""
    return ErrorEvent(
        message=message, error_type="invalid_request_error", code=code, status=400, param=param
    )


def reject_payload(client: redis.Redis, payload: dict[str, object], error: Exception) -> None:
    """A job payload this worker cannot read (from another API version, or a
    value the job model refuses): its client hears a 400 instead of waiting
    for an answer that never comes."""
    request_id = payload.get("request_id")
    log.warning("job %r has an invalid payload: %s", request_id, error)
    if not isinstance(request_id, str):
        return
    event = bad_request(f"the job could not be read: {error}")
    try:
        client.publish(keys.stream_channel(request_id), encode(event))
    except redis.RedisError as exc:
        log.warning("could not report the invalid job %s: %s", request_id, exc)


def report_failure(client: redis.Redis, request_id: str, message: str) -> None:
    """A job that raised: its client hears of it (unless Redis is what broke:
    the API then ends the stream itself)."""
    try:
        client.publish(keys.stream_channel(request_id), encode(ErrorEvent(message=message)))
    except Exception as exc:
        log.warning("could not report the failure of %s: %s", request_id, exc)
