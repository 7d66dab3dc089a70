"""Forgetting what is no longer needed, so the tables a message passes through stay the size of
`CHATOPS_RETENTION_DAYS` of traffic instead of growing forever.

Forgotten after that many days: delivery keys (platforms redeliver within minutes or hours, so an
older key can never see its event again), inbox messages that were answered or refused (their
payload is the user's text), outbox jobs that were delivered or given up, and the rows of replicas
that stopped without leaving (killed) and have been silent as long. Kept: everything
still in flight (queued, held or running messages, pending jobs), conversations, runs,
approvals and the audit chain, which records what happened and is never pruned here.

Each pass deletes in small batches, each its own short transaction, so acks (which skip the queue
background transactions wait in) never wait behind a long delete holding SQLite's write lock. Any
replica's sweeper may run a pass; deleting what another replica deleted is harmless.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from bot.core.context import AppContext
from storage.models import CardCopy, InboxEvent, InboxStatus, OutboxJob, OutboxStatus, Replica, SeenKey, table_of
from storage.sessions import DbSession, rowcount

log = logging.getLogger("chatops.retention")
BATCH = 500  # rows per transaction
MAX_BATCHES = 40  # per table and pass: a large backlog is worked off over several passes
PASS_EVERY = 3600.0  # seconds between passes in one process

_KEYS, _INBOX, _JOBS, _REPLICAS = table_of(SeenKey), table_of(InboxEvent), table_of(OutboxJob), table_of(Replica)
_COPIES = table_of(CardCopy)
_CUTOFF: sa.BindParameter[datetime] = sa.bindparam("b_cutoff")
_FORGETTABLE = {
    "delivery keys": (_KEYS, _KEYS.c.key, _KEYS.c.created_at < _CUTOFF),
    "answered messages": (
        _INBOX, _INBOX.c.id, sa.and_(_INBOX.c.status.in_((InboxStatus.DONE, InboxStatus.REFUSED)), _INBOX.c.updated_at < _CUTOFF),
    ),
    "delivered outbox jobs": (
        _JOBS, _JOBS.c.id, sa.and_(_JOBS.c.status.in_((OutboxStatus.SENT, OutboxStatus.GAVE_UP)), _JOBS.c.created_at < _CUTOFF),
    ),
    "silent replicas": (_REPLICAS, _REPLICAS.c.id, _REPLICAS.c.heartbeat_at < _CUTOFF),  # killed, never left
    "card copies": (_COPIES, _COPIES.c.id, _COPIES.c.created_at < _CUTOFF),  # their approvals long decided or expired
}  # fmt: skip
_DELETES = {
    what: sa.delete(table).where(key.in_(sa.select(key).where(older).limit(sa.bindparam("b_batch"))))
    for what, (table, key, older) in _FORGETTABLE.items()
}


class Retention:
    """`due()` says whether a pass is due in this process; `forget()` runs one and returns what it deleted."""

    def __init__(self, ctx: AppContext, *, batch: int = BATCH) -> None:
        self.ctx = ctx
        self.batch = batch
        self._last: datetime | None = None

    def due(self) -> bool:
        days = self.ctx.settings.retention_days
        now = self.ctx.clock()
        return days > 0 and (self._last is None or (now - self._last).total_seconds() >= PASS_EVERY)

    async def forget(self) -> dict[str, int]:
        now = self.ctx.clock()
        self._last = now
        if self.ctx.settings.retention_days <= 0:  # keep everything
            return dict.fromkeys(_DELETES, 0)
        cutoff = now - timedelta(days=self.ctx.settings.retention_days)
        forgotten = {what: await self._delete(statement, cutoff) for what, statement in _DELETES.items()}
        if any(forgotten.values()):
            older = f"older than {self.ctx.settings.retention_days} days"
            log.info("retention: forgot %s", ", ".join(f"{n} {what}" for what, n in forgotten.items()) + f" ({older})")
        return forgotten

    async def _delete(self, statement: sa.Delete, cutoff: datetime) -> int:
        async def batch(session: DbSession) -> int:
            return rowcount(await session.execute(statement, {"b_cutoff": cutoff, "b_batch": self.batch}))

        total = 0
        for _ in range(MAX_BATCHES):
            deleted = await self.ctx.db.run(batch)
            total += deleted
            if deleted < self.batch:
                break
        return total
