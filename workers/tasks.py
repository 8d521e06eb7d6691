"""Celery tasks: thin wrappers that hand their payload to plain functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from schemas import keys
from schemas.events import encode
from workers.sink import bad_request

if TYPE_CHECKING:
    from workers.bulk import BulkRunner
    from workers.embed import EmbedRuntime
    from workers.generate import WorkerRuntime


def _reject(client: redis.Redis, payload: dict[str, Any], message: str) -> None:
    event = bad_request(message, code="unsupported_model", param="model")
    client.publish(keys.stream_channel(str(payload.get("request_id", ""))), encode(event))


def register(
    app: Celery,
    runtime: WorkerRuntime | None,
    embed_runtime: EmbedRuntime | None,
    bulk: BulkRunner,
    *,
    model: str,
) -> None:
    client = (
        runtime.redis if runtime is not None else embed_runtime.redis if embed_runtime else None
    )

    @app.task(name=keys.TASK_GENERATE, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def generate(payload: dict[str, Any]) -> None:
        if runtime is None:
            assert client is not None
            _reject(client, payload, f"model '{model}' serves embeddings, not text generation")
            return
        from workers.generate import run_generate

        run_generate(runtime, payload)

    @app.task(name=keys.TASK_EMBED, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def embed(payload: dict[str, Any]) -> None:
        if embed_runtime is None:
            assert client is not None
            kind = "rerank" if payload.get("kind") == "rerank" else "embeddings"
            _reject(client, payload, f"model '{model}' does not serve {kind}")
            return
        from workers.embed import run_embed

        run_embed(embed_runtime, payload)

    @app.task(name=keys.TASK_BULK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def bulk_chunk(chunk: str) -> None:
        # Returns once the lines are in the engine: a chunk never holds a
        # consumer thread, and the database, not this message, tracks them.
        bulk.run_chunk(chunk)
