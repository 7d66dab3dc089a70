"""Workers woken by one signal all look at the same waiting conversations. Each worker of a machine
starts its own share of them at once, and another's only once it has waited (that worker is busy or
gone). Whatever still meets, one start drains each queue; a second start of the same conversation
waits for it and then finds nothing to do, instead of racing it to the conversation's row and being
rolled back (PostgreSQL: a transaction lock per conversation; SQLite: its write lock). Both backends."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import sqlalchemy as sa

from bot.core.sweeper import SHARE_GRACE, Share
from storage.models import Run, utcnow
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


async def waiting_conversations(app, count: int = CONVERSATIONS) -> list[str]:
    """`count` conversations recorded and left waiting, as by a front whose signal reached nobody yet."""
    app.core.wake = lambda: None
    keys = []
    for i in range(count):
        msg = message(f"question {i}")
        assert await app.core.accept_message(msg)
        keys.append(msg.conversation_key)
    return keys


async def runs(app) -> list[tuple[str, str, str]]:
    """(conversation, status, owner replica) of every run."""
    rows = await app.ctx.db.run(lambda s: s.execute(sa.select(Run.conversation_key, Run.status, Run.owner)), read=True)
    return sorted(rows.all())


async def test_each_worker_starts_its_own_share_of_the_waiting_conversations(bots, model, db_url):
    model.responder = lambda body: text("answered")
    workers = [await replica(bots, db_url), await replica(bots, db_url)]
    for index, worker in enumerate(workers):
        worker.sweeper.share = Share(index, len(workers))
    keys = await waiting_conversations(workers[0])

    await asyncio.gather(*(worker.sweeper.pick_up() for worker in workers))
    for worker in workers:
        await worker.ctx.tasks.idle()

    owner = {worker.ctx.replica_id: worker.sweeper.share for worker in workers}
    assert {key for key, *_ in await runs(workers[0])} == set(keys)
    for key, status, replica_id in await runs(workers[0]):
        assert status == "done" and owner[replica_id].holds(key)
    assert {worker.sweeper.share.index for worker in workers if worker.ctx.channels[PLATFORM].replies} == {0, 1}


async def test_a_worker_starts_another_workers_share_once_it_has_waited(bots, model, db_url):
    model.responder = lambda body: text("answered")
    alone = await replica(bots, db_url)  # worker 0 of 2; worker 1 is gone
    alone.sweeper.share = Share(0, 2)
    keys = await waiting_conversations(alone)
    mine = {key for key in keys if alone.sweeper.share.holds(key)}
    assert 0 < len(mine) < CONVERSATIONS

    await alone.sweeper.pick_up()
    await alone.ctx.tasks.idle()
    assert {key for key, *_ in await runs(alone)} == mine

    alone.ctx.clock = lambda: utcnow() + SHARE_GRACE + timedelta(seconds=0.1)
    await alone.sweeper.pick_up()
    await alone.ctx.tasks.idle()
    assert [(key, status) for key, status, _ in await runs(alone)] == sorted((key, "done") for key in keys)
    assert alone.ctx.channels[PLATFORM].replies == ["answered"] * CONVERSATIONS


async def test_two_workers_starting_the_same_conversations_at_once_never_collide(bots, model, db_url):
    model.responder = lambda body: text("answered")
    first, second = await replica(bots, db_url), await replica(bots, db_url)
    keys = await waiting_conversations(first)
    inserts = [conversation_inserts(first), conversation_inserts(second)]

    await asyncio.gather(*(app.core.runner.process_conversation(key) for key in keys for app in (first, second)))
    for app in (first, second):
        await app.ctx.tasks.idle()

    assert inserts[0][0] + inserts[1][0] == CONVERSATIONS  # no start raced another to a conversation's row
    assert [(key, status) for key, status, _ in await runs(first)] == sorted((key, "done") for key in keys)
    replies = first.ctx.channels[PLATFORM].replies + second.ctx.channels[PLATFORM].replies
    assert replies == ["answered"] * CONVERSATIONS


def start_reads(app, key: str) -> list[int]:
    """How many times a start of this replica reads the conversation's queue from now on."""
    reads = [0]

    def count(_conn, _cursor, statement: str, parameters, *_: object) -> None:
        sql = " ".join(statement.lower().replace('"', "").split())
        values = parameters.values() if isinstance(parameters, dict) else parameters  # psycopg's are named
        if sql.startswith("select inbox_event.id, inbox_event.status, inbox_event.payload") and key in values:
            reads[0] += 1

    sa.event.listen(app.ctx.db.sync_engine, "before_cursor_execute", count)
    return reads


async def test_wake_ups_while_a_conversation_waits_for_a_run_slot_start_it_once(bots, model, db_url):
    model.responder = lambda body: text("answered")
    worker = await replica(bots, db_url)
    (key,) = await waiting_conversations(worker, 1)
    slots, held, release = worker.ctx.run_slots, asyncio.Event(), asyncio.Event()
    slots.limit = 1

    async def busy_slot() -> None:  # another run holds the worker's only slot
        async with slots.run():
            held.set()
            await release.wait()

    holder = asyncio.create_task(busy_slot())
    await held.wait()
    reads = start_reads(worker, key)
    await worker.sweeper.pick_up()
    async with asyncio.timeout(10):
        while not slots.waiting:  # the conversation's task takes its place in the line for a slot
            await asyncio.sleep(0)
    for _ in range(2):  # two more wake-ups while it waits
        await worker.sweeper.pick_up()
    release.set()
    await holder
    await worker.ctx.tasks.idle()

    assert reads[0] == 1  # its one start read the whole queue; nobody started it again for nothing
    assert worker.ctx.channels[PLATFORM].replies == ["answered"]
