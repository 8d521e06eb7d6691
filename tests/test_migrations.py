"""Alembic upgrade and downgrade on real Postgres and on SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from inferq.migrate import downgrade, upgrade
from schemas.db import make_engine
from schemas.tables import UsageRecord


def _check_round_trip(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        assert "usage" in inspector.get_table_names()
        columns = {c["name"] for c in inspector.get_columns("usage")}
        assert {"model", "endpoint", "prompt_tokens", "completion_tokens", "ttft_ms"} <= columns
        assert {"duration_ms", "status", "request_id", "created_at"} <= columns
        # Accounts: keys, owners, usage per key and batch.
        assert {"key_id", "cached_tokens", "batch_id"} <= columns
        assert "api_keys" in inspector.get_table_names()
        assert "owner" in {c["name"] for c in inspector.get_columns("files")}
        assert {"owner", "estimated_tokens"} <= {
            c["name"] for c in inspector.get_columns("batches")
        }
        assert "ix_usage_key_created_at" in {i["name"] for i in inspector.get_indexes("usage")}
        with Session(engine) as session, session.begin():
            session.add(
                UsageRecord(
                    request_id="r1",
                    model="m",
                    endpoint="completions",
                    prompt_tokens=3,
                    completion_tokens=4,
                    ttft_ms=1.5,
                    duration_ms=9.0,
                    status="completed",
                    created_at=datetime.now(UTC),
                )
            )
        with Session(engine) as session:
            row = session.scalars(select(UsageRecord)).one()
            assert (row.prompt_tokens, row.completion_tokens, row.status) == (3, 4, "completed")
            assert row.id is not None
        downgrade(url, "base")
        assert "usage" not in inspect(engine).get_table_names()
        # And up again: the migration is repeatable.
        upgrade(url)
        assert "usage" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_postgres_upgrade_and_downgrade(pg_url: str) -> None:
    _check_round_trip(pg_url)


def test_sqlite_upgrade_and_downgrade(tmp_path: Path) -> None:
    _check_round_trip(f"sqlite:///{tmp_path / 'inferq.db'}")


def test_migrations_match_the_tables(pg_url: str) -> None:
    """Autogenerate finds nothing to do: the migration and schemas.tables agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from schemas.tables import Base

    upgrade(pg_url)
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("prefix", ["postgres://", "postgresql://"])
def test_plain_postgres_urls_use_psycopg(prefix: str) -> None:
    from schemas.settings import normalize_database_url

    assert normalize_database_url(prefix + "u@h/db") == "postgresql+psycopg://u@h/db"
