"""Per-user limits that hold under bursts and across replicas.

`admit` counts a request against `requests_per_minute` with one conditional UPDATE on the user's
`quota` row (a fixed one-minute window), so two transactions can never both take the last slot.
`lock_user` takes the same row's lock, so a count of pending approvals made right after it cannot
race with another replica creating approvals for the same user.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col

from storage.models import Quota
from storage.sessions import DbSession, rowcount

WINDOW = timedelta(minutes=1)


async def _ensure_row(session: DbSession, key: str, now: datetime) -> None:
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    await session.execute(
        insert(Quota).values(key=key, window_start=now, count=0, version=0).on_conflict_do_nothing(index_elements=["key"])
    )


async def admit(session: DbSession, key: str, limit: int, now: datetime) -> bool:
    """Take one of `limit` slots of the current minute for `key`; False when none is left."""
    await _ensure_row(session, key, now)
    stale = col(Quota.window_start) <= now - WINDOW
    result = await session.execute(
        sa.update(Quota)
        .where(col(Quota.key) == key, sa.or_(stale, col(Quota.count) < limit))
        .values(
            count=sa.case((stale, 1), else_=col(Quota.count) + 1),
            window_start=sa.case((stale, now), else_=col(Quota.window_start)),
            version=Quota.version + 1,
        )
    )
    return bool(rowcount(result))


async def lock_user(session: DbSession, key: str, now: datetime) -> None:
    """Hold `key`'s quota row until the transaction ends (serialises per-user counts)."""
    await _ensure_row(session, key, now)
    await session.execute(sa.update(Quota).where(col(Quota.key) == key).values(version=col(Quota.version) + 1))
