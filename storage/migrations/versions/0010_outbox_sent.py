"""outbox_sent: a delivered job marked sent without waiting on its row's lock

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-12 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.models

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox_sent",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("sent_at", storage.models.UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_outbox_sent_job_id", "outbox_sent", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_sent_job_id", table_name="outbox_sent")
    op.drop_table("outbox_sent")
