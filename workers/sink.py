"""Publishes engine events on each request's pub/sub channel."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from schemas import keys


class RedisSink:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
        # One round trip per engine step, whatever the number of sequences.
        pipe = self._client.pipeline(transaction=False)
        for request_id, payload in events:
            pipe.publish(keys.stream_channel(request_id), payload)
        pipe.execute()
