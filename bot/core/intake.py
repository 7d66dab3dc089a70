"""Recording inbound messages: the ack path, with group commit.

A message is recorded once (its delivery keys are unique) before the platform gets its ack. Messages
that arrive while a recording transaction is running wait for the next one, which records them all:
at rest each message has a transaction of its own (no added latency); in a burst, one transaction
(one commit, one fsync on SQLite, one set of round trips on PostgreSQL) records many, so acks keep
up. A key that another replica recorded between our look and our INSERT makes the whole batch fail
its uniqueness check; the batch is then recorded one message at a time, each on its own. A batch
waits at most `URGENT_BUDGET` for the database; a message may first wait for the batch before it, so
its ack comes within about two budgets (2 s, inside Slack's 3 s), refused with 5xx if need be.
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
from bot.core.group_commit import settle
from storage.audit import entry
from storage.engine import is_transient
from storage.models import InboxEvent, InboxStatus, SeenKey, table_of
from storage.prepared import Prepared
from storage.sessions import DbSession

BATCH_LIMIT = 200  # messages per recording transaction
# Prepared once (`storage.prepared`); an INSERT of many rows is one `executemany`.
_SEEN = Prepared(sa.select(col(SeenKey.key)).where(col(SeenKey.key).in_(sa.bindparam("keys", expanding=True))))
_INSERT_KEYS, _INSERT_EVENTS = Prepared(sa.insert(table_of(SeenKey))), Prepared(sa.insert(table_of(InboxEvent)))


@dataclass
class _Pending:
    msg: IncomingMessage
    inbox_id: str = field(default_factory=lambda: "in-" + uuid.uuid4().hex[:16])
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Intake:
    """Records messages durably, batching those that arrive together. `record(msg)` returns True for
    a new message, False for a duplicate delivery, or raises what the transaction raised."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._waiting: list[_Pending] = []
        self._flushing = False

    async def record(self, msg: IncomingMessage) -> bool:
        pending = _Pending(msg)
        self._waiting.append(pending)
        if not self._flushing:
            self._flushing = True
            self.ctx.tasks.spawn(self._flush_all(), name="intake")
        return await asyncio.shield(pending.done)  # a caller that gives up does not cancel the batch

    async def _flush_all(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:BATCH_LIMIT], self._waiting[BATCH_LIMIT:]
                await self._flush(batch)
        except BaseException as exc:  # cancelled at shutdown: nobody is left waiting for an answer
            for pending in [*batch, *self._waiting]:
                settle(pending.done, exc)
            self._waiting = []
            raise
        finally:
            self._flushing = False

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            outcome = await self.ctx.db.run(lambda s: self._record_batch(s, batch), urgent=True)
        except Exception as exc:  # noqa: BLE001 - sorted below; every waiting caller learns its outcome
            if len(batch) > 1 and not is_transient(exc):
                # A key recorded meanwhile by another replica, or one message the database refuses:
                # each on its own, so one bad message never holds the others back.
                await asyncio.gather(*(self._flush([one]) for one in batch))
                return
            if not isinstance(exc, IntegrityError):
                for pending in batch:
                    settle(pending.done, exc)
                return
            outcome = {batch[0].inbox_id: False}  # its key was recorded meanwhile: a duplicate
        for pending in batch:
            settle(pending.done, outcome[pending.inbox_id])

    async def _record_batch(self, session: DbSession, batch: list[_Pending]) -> dict[str, bool]:
        """Insert the new messages of `batch`; {inbox id: new?}. Keys already seen (stored, or earlier in
        the batch) make a message a duplicate."""
        keys = {k for p in batch for k in _keys(p.msg)}
        seen = set((await _SEEN.run(session, {"keys": list(keys)})).scalars())
        fresh: list[_Pending] = []
        for pending in batch:
            mine = set(_keys(pending.msg))
            if not mine & seen:
                fresh.append(pending)
            seen |= mine
        if fresh:
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
