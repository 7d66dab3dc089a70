"""copies of an approval's card posted elsewhere (a `pending` answer), patched with the card

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 21:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.models

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "card_copy",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("approval_id", sa.String(length=40), nullable=False),
        sa.Column("platform", sa.String(length=20), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=False),
        sa.Column("thread", sa.JSON(), nullable=False),
        sa.Column("created_at", storage.models.UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_card_copy_approval_id", "card_copy", ["approval_id"])
    op.create_index("ix_card_copy_created_at", "card_copy", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_card_copy_created_at", table_name="card_copy")
    op.drop_index("ix_card_copy_approval_id", table_name="card_copy")
    op.drop_table("card_copy")
