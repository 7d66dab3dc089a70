"""Delivered messages are marked sent by group commit: answers delivered while a mark is being
written share the next transaction (`bot.core.group_commit`), and each delivery still waits for the
commit that carries its mark. Both backends."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from storage.models import OutboxJob
from tests.fakes.openai_server import text
from tests.fault_helpers import PLATFORM, FaultChannel, message
from tests.support_tools import Ledger, notes_toolset

CONVERSATIONS = 20


def mark_writes(app) -> list[int]:
    """How many statements mark jobs sent from now on (an executemany counts once)."""
    writes = [0]

    def count(_conn, _cursor, statement: str, *_: object) -> None:
        sql = " ".join(statement.lower().replace('"', "").split())
        if "update outbox_job set status=" in sql and "message_id=" in sql:  # PostgreSQL's: inside a WITH
            writes[0] += 1

    sa.event.listen(app.ctx.db.sync_engine, "before_cursor_execute", count)
    return writes


async def test_answers_delivered_together_are_marked_sent_together(bots, model, db_url):
    model.responder = lambda body: text("answered")
    app = await bots.start(database_url=db_url, toolsets=[notes_toolset(Ledger())], CHATOPS_SWEEP_INTERVAL="3600")
    app.ctx.channels[PLATFORM] = FaultChannel()
    await bots.run(app)
    writes = mark_writes(app)

    accepted = await asyncio.gather(*(app.core.accept_message(message(f"question {i}")) for i in range(CONVERSATIONS)))
    assert all(accepted)
    await app.ctx.tasks.idle()

    assert app.ctx.channels[PLATFORM].replies == ["answered"] * CONVERSATIONS
    statuses = await app.ctx.db.run(lambda s: s.execute(sa.select(OutboxJob.status)), read=True)
    assert set(statuses.scalars().all()) == {"sent"}
    assert 0 < writes[0] < CONVERSATIONS  # some transactions marked several answers
