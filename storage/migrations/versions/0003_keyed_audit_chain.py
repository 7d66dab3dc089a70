"""keyed audit chain: `audit_event.key_id`, `audit_staged.seal`

Rows chained before this revision keep `key_id` NULL: they stay verifiable as the legacy
(unkeyed SHA-256) segment at the start of the chain. The first time a keyed bot or CLI chains,
it appends an `audit_keyed` row, sealed under the key, that records the legacy head; every row
after it is an HMAC under the key ring (see `storage/audit.py`).

Revision ID: 0003_audit_keys
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_audit_keys"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_event") as batch:
        batch.add_column(sa.Column("key_id", sa.String(length=16), nullable=True))
    with op.batch_alter_table("audit_staged") as batch:
        batch.add_column(sa.Column("seal", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_staged") as batch:
        batch.drop_column("seal")
    with op.batch_alter_table("audit_event") as batch:
        batch.drop_column("key_id")
