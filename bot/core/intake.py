"""Recording inbound messages: the ack path, with group commit.

A message is recorded once (its delivery keys are unique) before the platform gets its ack. Messages
that arrive while a recording transaction is running wait for the next one, which records them all:
at rest each message has a transaction of its own (no added latency); in a burst, one transaction
(one commit, one fsync on SQLite, one set of round trips on PostgreSQL) records many, so acks keep
up. A key that another replica recorded between our look and our INSERT makes the whole batch fail
its uniqueness check; the batch is then recorded one message at a time, each on its own. A batch
waits at most `URGENT_BUDGET` for the database; a message may first wait for the batch before it, so
its ack comes within about two budgets (2 s, inside Slack's 3 s), refused with 5xx if need be.
The batching itself is `bot.core.group_commit`'s; here is how a batch is recorded and sorted out.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from bot.core.context import AppContext
from bot.core.events import IncomingMessage
from bot.core.group_commit import GroupCommit
from storage.audit import entry
from storage.engine import is_transient
from storage.models import InboxEvent, InboxStatus, SeenKey, table_of
from storage.prepared import Prepared, pipelined
from storage.sessions import DbSession

BATCH_LIMIT = 200  # messages per recording transaction
# Prepared once (`storage.prepared`); an INSERT of many rows is one `executemany`.
_SEEN = Prepared(sa.select(col(SeenKey.key)).where(col(SeenKey.key).in_(sa.bindparam("keys", expanding=True))))
_INSERT_KEYS, _INSERT_EVENTS = Prepared(sa.insert(table_of(SeenKey))), Prepared(sa.insert(table_of(InboxEvent)))


@dataclass(frozen=True)
class _Pending:
    msg: IncomingMessage
    inbox_id: str = field(default_factory=lambda: "in-" + uuid.uuid4().hex[:16])


class Intake:
    """Records messages durably, batching those that arrive together. `record(msg)` returns True for
    a new message, False for a duplicate delivery, or raises what the transaction raised."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._batches: GroupCommit[_Pending, bool] = GroupCommit(ctx.tasks, "intake", self._record_all, BATCH_LIMIT)

    async def record(self, msg: IncomingMessage) -> bool:
        return await self._batches.submit(_Pending(msg))

    async def _record_all(self, batch: list[_Pending]) -> list[bool | BaseException]:
        """Each message's outcome: new (True), a duplicate (False), or what kept it from being recorded."""
        try:
            outcome = await self.ctx.db.run(lambda s: self._record_batch(s, batch), urgent=True)
        except Exception as exc:  # noqa: BLE001 - sorted below; every waiting caller learns its outcome
            if len(batch) > 1 and not is_transient(exc):
                # A key recorded meanwhile by another replica, or one message the database refuses:
                # each on its own, so one bad message never holds the others back.
                alone = await asyncio.gather(*(self._record_all([one]) for one in batch))
                return [outcomes[0] for outcomes in alone]
            if not isinstance(exc, IntegrityError):
                return [exc] * len(batch)
            outcome = {batch[0].inbox_id: False}  # its key was recorded meanwhile: a duplicate
        return [outcome[pending.inbox_id] for pending in batch]

    async def _record_batch(self, session: DbSession, batch: list[_Pending]) -> dict[str, bool]:
        """Insert the new messages of `batch`; {inbox id: new?}. Keys already seen (stored, or earlier in
        the batch) make a message a duplicate. A message alone is not looked up first: a stored key
        fails its INSERT (`IntegrityError`, a duplicate for `_record_all`), one statement less at rest."""
        seen: set[str] = set()
        if len(batch) > 1:  # one look for the burst, so one redelivery does not fail the others' transaction
            keys = {k for p in batch for k in _keys(p.msg)}
            seen = set((await _SEEN.run(session, {"keys": list(keys)})).scalars())
        fresh: list[_Pending] = []
        for pending in batch:
            mine = set(_keys(pending.msg))
            if not mine & seen:
                fresh.append(pending)
            seen |= mine
        if fresh:
            async with pipelined(session):  # one round trip for its three INSERTs on PostgreSQL
                await self._insert(session, fresh)
        new = {p.inbox_id for p in fresh}
        return {p.inbox_id: p.inbox_id in new for p in batch}

    async def _insert(self, session: DbSession, fresh: list[_Pending]) -> None:
        ctx, now = self.ctx, self.ctx.clock()
        keys = [{"key": k, "inbox_id": p.inbox_id, "created_at": now} for p in fresh for k in _keys(p.msg)]
        await _INSERT_KEYS.run_many(session, keys)
        events = [
            {
                "id": p.inbox_id, "platform": p.msg.thread.platform, "conversation_key": p.msg.conversation_key,
                "payload": ctx.redactor.redact(p.msg.to_dict()), "status": InboxStatus.QUEUED, "created_at": now, "updated_at": now,
            }
            for p in fresh
        ]  # fmt: skip
        await _INSERT_EVENTS.run_many(session, events)
        rows = [
            entry(
                "request_received", platform=p.msg.user.platform, actor=p.msg.user.key, status="queued", inbox_id=p.inbox_id,
                conversation=p.msg.conversation_key, text=p.msg.text, keys=list(p.msg.dedupe_keys),
            )
            for p in fresh
        ]  # fmt: skip
        await ctx.audit.record_many(session, rows)


def _keys(msg: IncomingMessage) -> list[str]:
    """The message's delivery keys as stored (the column holds 300 characters), each once."""
    return list(dict.fromkeys(k[:300] for k in msg.dedupe_keys))
