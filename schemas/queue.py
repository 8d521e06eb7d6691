"""The Celery app both sides build: same broker, serializer and long-job settings."""

from __future__ import annotations

from celery import Celery

from schemas.settings import Settings


def make_celery(settings: Settings, *, name: str = "inferq") -> Celery:
    app = Celery(name, broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Results travel over pub/sub and usage goes to the database: a result
        # backend would only bloat Redis.
        task_ignore_result=True,
        result_backend=None,
        # A job is acknowledged only once it ran, and a job whose worker died is
        # put back rather than dropped.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Unacked jobs come back after this; it must exceed the longest job.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
    )
    return app
