"""an index on the outbox's run id (a run's progress message and its waiting edits are found by it;
without it each answer read every sent job)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 14:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_job_run_id", "outbox_job", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_job_run_id", table_name="outbox_job")
