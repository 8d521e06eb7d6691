"""Contracts shared by the API and the workers: settings, wire models, job and
stream-event payloads, Redis names and the database tables."""
