"""Retention (`CHATOPS_RETENTION_DAYS`): finished delivery keys, inbox messages and outbox jobs are
forgotten after that many days, in batches; what is in flight, conversations, runs, approvals and
the audit chain are kept. Both backends, through the sweeper as it runs in the product."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import sqlalchemy as sa

from bot.core import retention
from bot.core.channels import DeliveryFailed
from bot.core.retention import Retention
from storage.engine import make_sync_engine, normalise_url
from storage.models import utcnow
from tests.fakes.openai_server import text
from tests.fault_helpers import PLATFORM, FaultChannel, message, settle

QUIET = {"CHATOPS_SWEEP_INTERVAL": "3600"}  # sweeps only when the test says


async def answered_bot(bots, db_url, model, count: int, **env: str):
    """A bot that has answered `count` messages (each its own conversation)."""
    model.responder = lambda body: text("done")
    app = await bots.start(database_url=db_url, **QUIET, **env)
    app.ctx.channels[PLATFORM] = FaultChannel()
    await bots.run(app)
    for i in range(count):
        assert await app.core.accept_message(message(f"hello {i}", conversation=f"c{i}", key=f"k{i}"))
    await settle(app)
    return app


def counts(db_url: str) -> dict[str, int]:
    engine = make_sync_engine(normalise_url(db_url))
    try:
        with engine.connect() as conn:
            return {
                table: conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                for table in ("seen_key", "inbox_event", "outbox_job", "conversation", "run", "audit_event", "replica")
            }
    finally:
        engine.dispose()


async def test_finished_rows_older_than_the_retention_are_forgotten_and_the_record_is_kept(bots, model, db_url):
    app = await answered_bot(bots, db_url, model, 3)
    before = counts(db_url)
    assert before["seen_key"] == before["inbox_event"] == 3 and before["outbox_job"] >= 3

    assert set((await app.sweeper.retention.forget()).values()) == {0}
    app.ctx.clock = lambda: utcnow() + timedelta(days=31)  # a month on
    forgotten = await app.sweeper.retention.forget()

    assert forgotten == {
        "delivery keys": 3, "answered messages": 3, "delivered outbox jobs": before["outbox_job"], "silent replicas": 1,
        "card copies": 0,
    }  # fmt: skip
    await app.sweeper.heartbeat()  # its own row (silent for a month by the moved clock) comes back with a beat
    assert counts(db_url)["replica"] == 1
    after = counts(db_url)
    assert (after["seen_key"], after["inbox_event"], after["outbox_job"]) == (0, 0, 0)
    kept = ("conversation", "run", "audit_event")
    assert {t: after[t] for t in kept} == {t: before[t] for t in kept}


async def test_messages_in_flight_and_recent_keys_are_kept_and_still_refuse_a_redelivery(bots, model, db_url):
    app = await answered_bot(bots, db_url, model, 1)
    app.ctx.clock = lambda: utcnow() + timedelta(days=31)

    async def down() -> None:
        raise DeliveryFailed("the platform is down")

    channel = FaultChannel()
    channel.before_reply = down  # the answer's outbox job stays pending
    app.ctx.channels[PLATFORM] = channel
    assert await app.core.accept_message(message("a new one", conversation="fresh", key="new-key"))
    await settle(app)
    await app.sweeper.retention.forget()

    assert not await app.core.accept_message(message("a new one", conversation="fresh", key="new-key"))  # still a duplicate
    engine = make_sync_engine(normalise_url(db_url))
    try:
        with engine.connect() as conn:
            keys = set(conn.execute(sa.text("SELECT key FROM seen_key")).scalars())
            pending = conn.execute(sa.text("SELECT COUNT(*) FROM outbox_job WHERE status = 'pending'")).scalar_one()
    finally:
        engine.dispose()
    assert keys == {"new-key"} and pending >= 1  # the old key went, the new one and the undelivered answer stayed


async def test_a_backlog_is_forgotten_in_batches_each_its_own_transaction(bots, model, db_url):
    app = await answered_bot(bots, db_url, model, 5)
    deletes: list[int] = []
    sa.event.listen(
        app.ctx.db.sync_engine, "after_cursor_execute",
        lambda _c, cursor, statement, *_: deletes.append(cursor.rowcount) if statement.startswith("DELETE FROM seen_key") else None,
    )  # fmt: skip
    app.ctx.clock = lambda: utcnow() + timedelta(days=31)
    forgotten = await Retention(app.ctx, batch=2).forget()
    assert forgotten["delivery keys"] == 5 and forgotten["answered messages"] == 5
    assert deletes == [2, 2, 1]  # three transactions of at most two rows


async def test_retention_zero_keeps_everything_and_a_pass_is_due_hourly_but_not_at_start_up(bots, model, db_url):
    app = await answered_bot(bots, db_url, model, 1, CHATOPS_RETENTION_DAYS="0")
    app.ctx.clock = lambda: utcnow() + timedelta(days=365)
    assert not app.sweeper.retention.due()
    assert set((await app.sweeper.retention.forget()).values()) == {0}  # even when asked
    assert counts(db_url)["seen_key"] == 1

    other = await answered_bot(bots, db_url, model, 0)
    await other.sweeper.sweep()
    assert other.sweeper.retention.due()  # neither the start-up sweep (the port waits for it) nor a sweep made one
    await other.sweeper.retention.forget()  # what the periodic loop runs after its sweep
    assert not other.sweeper.retention.due()
    later = utcnow() + timedelta(seconds=retention.PASS_EVERY + 1)
    other.ctx.clock = lambda: later
    assert other.sweeper.retention.due()


async def test_the_periodic_sweep_runs_retention_on_its_own(bots, model, db_url):
    model.responder = lambda body: text("done")
    app = await bots.start(database_url=db_url, CHATOPS_SWEEP_INTERVAL="0.1")
    app.ctx.channels[PLATFORM] = FaultChannel()
    forgot = asyncio.Event()

    class Forgot(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("retention: forgot"):
                forgot.set()

    handler = Forgot()
    logging.getLogger(retention.log.name).addHandler(handler)
    try:
        await bots.run(app)
        assert await app.core.accept_message(message("hello", conversation="c0", key="k0"))
        await settle(app)
        assert counts(db_url)["seen_key"] == 1
        app.ctx.clock = lambda: utcnow() + timedelta(days=31)  # a month on: nobody calls forget() but the loop
        await asyncio.wait_for(forgot.wait(), 30)
    finally:
        logging.getLogger(retention.log.name).removeHandler(handler)
    assert counts(db_url)["seen_key"] == 0
