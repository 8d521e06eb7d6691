"""Inference engines a worker drives; independent of Celery and Redis."""
