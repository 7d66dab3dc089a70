"""The built-in CRM: leads in the bot's own database (the `crm_lead` table), SQLite or PostgreSQL.

The unique index on `crm_lead.email` is what guarantees one lead per address. Two creations
racing for the same address (two replicas on PostgreSQL) both read "absent"; the loser's INSERT
hits the index, its transaction rolls back, and it retries once as an update. On SQLite the
race cannot happen (`BEGIN IMMEDIATE` serialises writers) but the same code path holds.
`source_approval_id` records which approval created a lead: re-running that approval is a no-op.
Every transaction goes through `Database.run`, so a transient fault (a dropped connection, a busy
lock) is tried again from the transaction's start instead of ending a write "in doubt".
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from storage.engine import Database
from storage.models import CrmLead, utcnow
from storage.sessions import DbSession
from tools.crm.backend import (
    BUILTIN_NAME,
    CHANGED_CONCURRENTLY,
    NO_SUCH_LEAD,
    SEARCH_LIMIT,
    Lead,
    LeadFields,
    Outcome,
    normalise_email,
)
from tools.errors import ToolError

UPSERT_ATTEMPTS = 2


def _lead(row: CrmLead) -> Lead:
    assert row.id is not None
    return Lead(id=row.id, name=row.name, email=row.email, need=row.need, company=row.company, status=row.status, owner=row.owner)


class BuiltinCrm:
    """`CrmBackend` over the `crm_lead` table."""

    name: str = BUILTIN_NAME()

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, lead_id: int) -> Lead | None:
        async def read(session: DbSession) -> Lead | None:
            row = await session.get(CrmLead, lead_id)
            return _lead(row) if row is not None else None

        return await self.db.run(read, read=True)

    async def find_by_email(self, email: str) -> Lead | None:
        statement = select(CrmLead).where(CrmLead.email == normalise_email(email))

        async def read(session: DbSession) -> Lead | None:
            row = (await session.execute(statement)).scalar_one_or_none()
            return _lead(row) if row is not None else None

        return await self.db.run(read, read=True)

    async def search(self, query: str) -> list[Lead]:
        text = query.strip()
        columns = (col(CrmLead.name), col(CrmLead.email), col(CrmLead.company), col(CrmLead.need))
        statement = select(CrmLead).order_by(col(CrmLead.id)).limit(SEARCH_LIMIT)
        if text:
            statement = statement.where(sa.or_(*(c.icontains(text, autoescape=True) for c in columns)))

        async def read(session: DbSession) -> list[Lead]:  # no write lock: reads never wait for writers
            return [_lead(row) for row in (await session.execute(statement)).scalars()]

        return await self.db.run(read, read=True)

    async def upsert(self, fields: LeadFields, *, approval_id: str | None) -> tuple[Outcome, Lead]:
        for attempt in range(1, UPSERT_ATTEMPTS + 1):
            try:
                return await self._upsert_once(fields, approval_id)
            except IntegrityError:
                if attempt == UPSERT_ATTEMPTS:
                    raise ToolError(CHANGED_CONCURRENTLY(email=fields.email)) from None
        raise AssertionError("unreachable")

    async def _upsert_once(self, fields: LeadFields, approval_id: str | None) -> tuple[Outcome, Lead]:
        """One transaction, attempted again from its start after a transient fault (a dropped
        connection, a busy lock): it either committed or left nothing behind."""
        email = normalise_email(fields.email)

        async def write(session: DbSession) -> tuple[Outcome, Lead]:
            now = utcnow()
            row = (await session.execute(select(CrmLead).where(CrmLead.email == email))).scalar_one_or_none()
            if row is None:
                row = CrmLead(
                    name=fields.name,
                    email=email,
                    need=fields.need,
                    company=fields.company,
                    status="new",
                    source_approval_id=approval_id,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                await session.flush()  # the unique index speaks here, inside our transaction
                return "created", _lead(row)
            if approval_id is not None and row.source_approval_id == approval_id:
                return "unchanged", _lead(row)  # this approval already created it: a re-run does nothing
            changes = fields.changes_for(_lead(row))
            if not changes:
                return "unchanged", _lead(row)
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = now
            return "updated", _lead(row)

        return await self.db.run(write)

    async def update(self, lead_id: int, changes: dict[str, str]) -> Lead:
        async def write(session: DbSession) -> Lead:
            row = await session.get(CrmLead, lead_id)
            if row is None:
                raise ToolError(NO_SUCH_LEAD(lead_id=lead_id, crm=self.name))
            for key, value in changes.items():
                setattr(row, key, value)
            if changes:
                row.updated_at = utcnow()
            return _lead(row)

        return await self.db.run(write)
