"""Recording inbound messages with group commit (`bot/core/intake.py`), on both databases: a burst
shares transactions, each message is recorded exactly once (duplicates inside a burst included),
and a message the database refuses fails alone while the rest of its burst is recorded."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import sqlalchemy as sa

from bot.core.errors import StorageError
from bot.core.events import IncomingMessage, Thread, User
from storage.engine import URGENT_BUDGET
from tests.fakes.openai_server import text
from tests.fault_helpers import LockHolder

BURST = 60


def message(i: int, *, key: str | None = None, conversation: str | None = None) -> IncomingMessage:
    user = User("bench", f"U{i}", "T1", f"user{i}")
    key = key or f"burst:{i}"
    return IncomingMessage(user, f"hello {i}", Thread("bench", {"i": i}), conversation or key, (key,))


def count_commits(engine: sa.Engine) -> list[int]:
    commits = [0]
    sa.event.listen(engine, "commit", lambda *_: commits.__setitem__(0, commits[0] + 1))
    return commits


async def inbox(app, where: str = "1=1") -> int:
    async with app.ctx.db.transaction(read=True) as session:
        return int((await session.execute(sa.text(f"SELECT COUNT(*) FROM inbox_event WHERE {where}"))).scalar_one())


async def test_a_burst_shares_transactions_and_each_message_is_recorded_once(bots, model, db_url):
    model.responder = lambda body: text("ok")
    app = await bots.run(await bots.start(database_url=db_url))
    commits = count_commits(app.ctx.db.sync_engine)
    msgs = [message(i) for i in range(BURST)]
    msgs += [message(i) for i in range(0, BURST, 3)]  # redeliveries inside the same burst
    outcomes = await asyncio.gather(*(app.core.accept_message(m) for m in msgs))
    recording_commits = commits[0]
    assert outcomes[:BURST] == [True] * BURST and not any(outcomes[BURST:])
    assert await inbox(app) == BURST
    assert recording_commits < BURST // 2  # group commit: many messages per transaction
    again = await asyncio.gather(*(app.core.accept_message(message(i)) for i in range(BURST)))
    assert not any(again)  # later redeliveries are duplicates too
    await app.ctx.tasks.idle()
    async with app.ctx.db.transaction(read=True) as session:
        received = (
            await session.execute(sa.text("SELECT COUNT(*) FROM audit_event WHERE kind = 'request_received'"))
        ).scalar_one()
    assert received == BURST


async def test_a_message_the_database_refuses_fails_alone(bots, model, postgres_url):
    """PostgreSQL enforces the 300-character conversation key: that message's insert fails for good
    (not a transient fault), the burst it came in is recorded one by one, and only it is refused."""
    model.responder = lambda body: text("ok")
    app = await bots.run(await bots.start(database_url=postgres_url))
    msgs = [message(i) for i in range(20)]
    msgs[7] = message(7, conversation="c" * 400)
    results = await asyncio.gather(*(app.core.accept_message(m) for m in msgs), return_exceptions=True)
    refused = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert refused == [7] and not isinstance(results[7], StorageError)  # a real error, not "try again"
    assert all(r is True for i, r in enumerate(results) if i != 7)
    assert await inbox(app) == 19
    await app.ctx.tasks.idle()


@pytest.mark.parametrize("n", [1, 3])
async def test_at_rest_each_message_has_its_own_transaction_and_nothing_waits(bots, model, sqlite_url, n):
    model.responder = lambda body: text("ok")
    app = await bots.run(await bots.start())
    for i in range(n):
        assert await app.core.accept_message(message(100 + i))
    assert await inbox(app) == n
    await app.ctx.tasks.idle()


async def test_a_redelivery_alone_is_a_duplicate_found_by_its_insert(bots, model, db_url, caplog):
    """A message alone is not looked up before its INSERT: a redelivered one fails the INSERT of its
    stored key, which makes it a duplicate (nothing recorded twice, nothing logged as an error), and
    the next message records normally on both databases (PostgreSQL's failed transaction is gone)."""
    model.responder = lambda body: text("ok")
    app = await bots.run(await bots.start(database_url=db_url))
    assert await app.core.accept_message(message(1))
    again = [await app.core.accept_message(message(1)) for _ in range(3)]
    assert again == [False, False, False]
    assert await app.core.accept_message(message(2))
    assert await inbox(app) == 2
    await app.ctx.tasks.idle()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_message_behind_a_waiting_batch_is_still_answered_inside_slacks_three_seconds(bots, model, sqlite_url):
    """Another process holds the write lock: the first message's batch waits out its budget
    (`URGENT_BUDGET`) and is refused; a second message arriving meanwhile waits for that batch, then its
    own budget, and is refused too, inside Slack's 3 s (no retry starts past a budget: before, a retry's
    random pause of up to a second could carry a budget to 1.9 s and this ack to 2.9 s)."""
    model.responder = lambda body: text("ok")
    app = await bots.run(await bots.start())
    holder = LockHolder(app.settings.database_url.removeprefix("sqlite:///"))
    await holder.hold()
    try:
        first = asyncio.create_task(app.core.accept_message(message(1)))
        for _ in range(20):  # let the first batch start waiting for the lock
            await asyncio.sleep(0)
        started = time.perf_counter()
        with pytest.raises(StorageError):
            await app.core.accept_message(message(2))
        waited = time.perf_counter() - started
        with pytest.raises(StorageError):
            await first
    finally:
        await holder.release()
    assert waited < URGENT_BUDGET * 2.5, waited  # two budgets, plus room for a loaded machine
    assert await app.core.accept_message(message(2))  # redelivered after the release: recorded once
    assert await inbox(app) == 1
    await app.ctx.tasks.idle()
