"""Bulk jobs: the OpenAI Batches API's state, validation, scheduling and output."""
