"""accounts: API keys, owners of files and batches, usage per key

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("hint", sa.String(64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("batch_tokens", sa.BigInteger(), nullable=True),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.Column("quotas", sa.JSON(), nullable=True),
    )
    with op.batch_alter_table("usage") as usage:
        usage.add_column(sa.Column("key_id", sa.String(32), nullable=True))
        usage.add_column(
            sa.Column("cached_tokens", sa.Integer(), nullable=False, server_default="0")
        )
        usage.add_column(sa.Column("batch_id", sa.String(64), nullable=True))
    op.create_index("ix_usage_key_created_at", "usage", ["key_id", "created_at"])
    op.create_index("ix_usage_batch_id", "usage", ["batch_id"])
    with op.batch_alter_table("files") as files:
        files.add_column(sa.Column("owner", sa.String(32), nullable=True))
    op.create_index("ix_files_owner_created_at", "files", ["owner", "created_at"])
    with op.batch_alter_table("batches") as batches:
        batches.add_column(sa.Column("owner", sa.String(32), nullable=True))
        batches.add_column(
            sa.Column("estimated_tokens", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_index("ix_batches_owner_created_at", "batches", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_batches_owner_created_at", table_name="batches")
    with op.batch_alter_table("batches") as batches:
        batches.drop_column("estimated_tokens")
        batches.drop_column("owner")
    op.drop_index("ix_files_owner_created_at", table_name="files")
    with op.batch_alter_table("files") as files:
        files.drop_column("owner")
    op.drop_index("ix_usage_batch_id", table_name="usage")
    op.drop_index("ix_usage_key_created_at", table_name="usage")
    with op.batch_alter_table("usage") as usage:
        usage.drop_column("batch_id")
        usage.drop_column("cached_tokens")
        usage.drop_column("key_id")
    op.drop_table("api_keys")
