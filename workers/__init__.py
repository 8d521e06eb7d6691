"""inferq workers: one process per model (and GPU), running a batching engine
behind a Celery consumer of the model's queue."""
