"""A run's rows (`bot/core/run_rows.py`) on both databases: the start's one read returns the queued
messages oldest first and, once, the conversation they join."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bot.core import run_rows
from bot.core.events import IncomingMessage, Thread, User
from storage.engine import Database
from storage.models import InboxEvent, InboxStatus, table_of
from storage.sessions import DbSession

T0 = datetime(2026, 12, 4, 18, 0, tzinfo=UTC)
HISTORY = [{"role": "user", "content": "客户张三", "name": "U1"}, {"role": "assistant", "content": "好的"}]


def incoming(key: str, text: str) -> IncomingMessage:
    return IncomingMessage(User("slack", "U1", "T1", "ann"), text, Thread("slack", {"channel": "C1"}), key, (f"{key}:{text}",))


async def add_inbox(session: DbSession, key: str, texts: list[str], status: InboxStatus = InboxStatus.QUEUED) -> None:
    # Inserted newest first: the read must order them by arrival, not by insertion.
    for i, text in reversed(list(enumerate(texts))):
        at = T0 + timedelta(seconds=i)
        await session.execute(
            table_of(InboxEvent).insert().values(
                id=f"in-{key}-{text}", platform="slack", conversation_key=key, payload=incoming(key, text).to_dict(),
                status=status, created_at=at, updated_at=at,
            )
        )  # fmt: skip


async def test_the_start_reads_queued_messages_and_their_conversation_in_one_statement(db: Database):
    async def fill(session: DbSession) -> None:
        await run_rows.create_conversation(session, "c-with", "slack", HISTORY, None, T0)
        await add_inbox(session, "c-with", ["one", "two", "three"])
        await add_inbox(session, "c-with", ["answered"], InboxStatus.DONE)
        await add_inbox(session, "c-new", ["first"])
        await run_rows.create_conversation(session, "c-idle", "slack", HISTORY, None, T0)

    await db.run(fill)
    queued, conv = await db.run(lambda s: run_rows.queued_and_conversation(s, "c-with"))
    assert [q.message.text for q in queued] == ["one", "two", "three"]
    assert conv is not None and (conv.messages, conv.active_run_id, conv.version) == (HISTORY, None, 1)

    queued, conv = await db.run(lambda s: run_rows.queued_and_conversation(s, "c-new"))
    assert [q.message.text for q in queued] == ["first"] and conv is None  # no row yet: the start creates it

    assert await db.run(lambda s: run_rows.queued_and_conversation(s, "c-idle")) == ([], None)
