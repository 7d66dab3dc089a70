"""Workers woken by one signal all look at the same waiting conversations. One start drains each
queue; a second start of the same conversation waits for it and then finds nothing to do, instead
of racing it to the conversation's row and being rolled back (PostgreSQL: a transaction lock per
conversation; SQLite: its write lock). Both backends."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from storage.models import Run
from tests.fakes.openai_server import text
from tests.fault_helpers import PLATFORM, FaultChannel, message
from tests.support_tools import Ledger, notes_toolset

CONVERSATIONS = 20


async def replica(bots, db_url):
    app = await bots.start(database_url=db_url, toolsets=[notes_toolset(Ledger())], CHATOPS_SWEEP_INTERVAL="3600")
    app.ctx.channels[PLATFORM] = FaultChannel()
    return await bots.run(app)


def conversation_inserts(app) -> list[int]:
    """How many times this replica tries to insert a conversation's row from now on."""
    inserts = [0]

    def count(_conn, _cursor, statement: str, *_: object) -> None:
        if " ".join(statement.lower().replace('"', "").split()).startswith("insert into conversation"):
            inserts[0] += 1

    sa.event.listen(app.ctx.db.sync_engine, "before_cursor_execute", count)
    return inserts


async def test_two_workers_starting_the_same_conversations_at_once_never_collide(bots, model, db_url):
    model.responder = lambda body: text("answered")
    first, second = await replica(bots, db_url), await replica(bots, db_url)
    first.core.wake = lambda: None  # a front whose signal has not reached anyone yet: the messages wait
    keys = []
    for i in range(CONVERSATIONS):
        msg = message(f"question {i}")
        assert await first.core.accept_message(msg)
        keys.append(msg.conversation_key)
    inserts = [conversation_inserts(first), conversation_inserts(second)]

    await asyncio.gather(*(app.core.runner.process_conversation(key) for key in keys for app in (first, second)))
    for app in (first, second):
        await app.ctx.tasks.idle()

    assert inserts[0][0] + inserts[1][0] == CONVERSATIONS  # no start raced another to a conversation's row
    runs = await first.ctx.db.run(lambda s: s.execute(sa.select(Run.conversation_key, Run.status)), read=True)
    assert sorted(runs.all()) == sorted((key, "done") for key in keys)
    replies = first.ctx.channels[PLATFORM].replies + second.ctx.channels[PLATFORM].replies
    assert replies == ["answered"] * CONVERSATIONS
