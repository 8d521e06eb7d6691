"""Alembic migrations for inferq's database."""
