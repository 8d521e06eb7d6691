"""The Celery app both sides build: same broker, serializer and long-job settings.

What happens to a job's message (Redis transport, threads pool, what the
reliability tests check):
- A worker takes at most one message per consumer thread (prefetch 1 x slots)
  and acknowledges it when the task returns (`acks_late`).
- SIGKILL (or an abort, or the OOM killer) takes the whole worker: the threads
  pool has no parent process to notice, so `task_reject_on_worker_lost` never
  applies. The dead worker's unacknowledged messages stay in Redis' `unacked`
  hash until a live worker's sweep finds them older than the visibility
  timeout, and are then dropped: they are past `expires` (request_timeout),
  or their cancel key is set. Celery never re-runs an interactive job.
- A consumer that loses its Redis connection puts its unacknowledged
  messages back (kombu restores them when the channel closes), running jobs
  included; the copy finds the job's started key (keys.started_key, set NX by
  the first copy) and is dropped. An interactive job runs at most once per id.
- Re-running is the API's call, because only the API knows whether the client
  saw a token: it watches the heartbeat of the worker that accepted each job
  (api/streaming/watch.py), ends a job whose tokens went out with a 503
  `worker_lost`, and queues one that had sent nothing again under a new id
  (the old id's cancel key set, so a stray copy is dropped).
- Bulk lines are tracked by leases in the database, not by their messages.
"""

from __future__ import annotations

from celery import Celery

from schemas.settings import Settings


def make_celery(settings: Settings, *, name: str = "inferq") -> Celery:
    app = Celery(name, broker=settings.redis_url)
    timeout = settings.redis_timeout
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Results travel over pub/sub and usage goes to the database: a result
        # backend would only bloat Redis.
        task_ignore_result=True,
        result_backend=None,
        # A job is acknowledged only once it ran. A worker that dies leaves its
        # message unacknowledged; see the module docstring for what follows.
        task_acks_late=True,
        # Only the prefork pool (a dead child) would requeue here, straight back
        # into the same stream: never wanted, so off.
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Unacked jobs come back after this; it must exceed the longest job.
            "visibility_timeout": settings.visibility_timeout,
            # Bounded waits: with Redis down, enqueueing fails within seconds
            # (a 503) instead of hanging the request.
            "socket_timeout": max(timeout, 2.0),
            "socket_connect_timeout": timeout,
        },
        broker_connection_timeout=timeout,
        task_publish_retry_policy={
            # One retry: enough for a pooled connection Redis dropped.
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        broker_connection_retry_on_startup=True,
        # A worker outlives any Redis outage: it reconnects for as long as it
        # takes (Celery's default gives up, and exits, after 100 tries).
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
    )
    return app
