"""inferq: a task-queue batch inference service with an OpenAI-compatible API."""

__version__ = "0.1.0"
