"""Celery tasks: thin wrappers that hand their payload to plain functions."""

from __future__ import annotations

from typing import Any

from celery import Celery

from schemas import keys
from workers.service import WorkerRuntime, run_generate


def register(app: Celery, runtime: WorkerRuntime) -> None:
    @app.task(name=keys.TASK_GENERATE, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def generate(payload: dict[str, Any]) -> None:
        run_generate(runtime, payload)
