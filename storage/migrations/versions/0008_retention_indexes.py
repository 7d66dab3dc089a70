"""indexes the retention pass deletes by: an inbox message's last change, an outbox job's creation

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 15:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_inbox_event_updated_at", "inbox_event", ["updated_at"])
    op.create_index("ix_outbox_job_created_at", "outbox_job", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_job_created_at", table_name="outbox_job")
    op.drop_index("ix_inbox_event_updated_at", table_name="inbox_event")
