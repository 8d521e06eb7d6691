"""hardening: one usage row per request, the batch scheduler's fencing token

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Older versions could write a request's usage twice (a redelivered job,
    # a stale bulk lease): keep the first row of each before the index.
    op.execute("DELETE FROM usage WHERE id NOT IN (SELECT min(id) FROM usage GROUP BY request_id)")
    op.drop_index("ix_usage_request_id", table_name="usage")
    op.create_index("ux_usage_request_id", "usage", ["request_id"], unique=True)
    op.create_table(
        "batch_scheduler",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("batch_scheduler")
    op.drop_index("ux_usage_request_id", table_name="usage")
    op.create_index("ix_usage_request_id", "usage", ["request_id"])
