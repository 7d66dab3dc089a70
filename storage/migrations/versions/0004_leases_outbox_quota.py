"""leases on runs and executions, the durable outbox, per-user quotas, preview facts

Revision ID: 0004
Revises: 0003_audit_keys
Create Date: 2026-12-02 01:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import storage.models

revision = "0004"
down_revision = "0003_audit_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("lease_until", storage.models.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index("ix_run_lease_until", ["lease_until"])
    with op.batch_alter_table("approval") as batch:
        batch.add_column(sa.Column("lease_until", storage.models.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("preview_facts", sa.JSON(), nullable=True))
    op.create_table(
        "outbox_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("platform", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("thread_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("thread", sa.JSON(), nullable=False),
        sa.Column("approval_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", storage.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deadline", storage.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
        sa.Column("lease_until", storage.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
        sa.Column("message_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("created_at", storage.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_outbox_job_thread_key", "outbox_job", ["thread_key"])
    op.create_index("ix_outbox_job_approval_id", "outbox_job", ["approval_id"])
    op.create_index("ix_outbox_job_status", "outbox_job", ["status"])
    op.create_index("ix_outbox_job_next_attempt_at", "outbox_job", ["next_attempt_at"])
    op.create_table(
        "quota",
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("window_start", storage.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("quota")
    op.drop_table("outbox_job")
    with op.batch_alter_table("approval") as batch:
        batch.drop_column("preview_facts")
        batch.drop_column("lease_until")
    with op.batch_alter_table("run") as batch:
        batch.drop_index("ix_run_lease_until")
        batch.drop_column("version")
        batch.drop_column("lease_until")
