"""inferq's HTTP front: validates requests, queues them as Celery jobs and
relays the workers' events as OpenAI responses and SSE streams."""
