"""PostgreSQL connection loss at each step of a turn: another connection ends every connection of
the bot (`pg_terminate_backend`) right before the message is delivered, while the model call is in
flight, while the card is posted, right before the click, while the write tool runs, after it
(the next model call) and while the answer is posted. The turn must finish, nothing may stay
running, executing or queued, and the tool runs exactly once and is recorded as succeeded."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from bot.app import App
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, IncomingMessage
from tests.fakes.openai_server import Reply, calls, text
from tests.fault_helpers import ALICE, FaultChannel, Stages, message, pending_ids, schema_of, settle, summary, terminate_backends

STEPS = ["ack", "model_call", "card_post", "decision", "during_tool", "after_tool", "answer_post"]


class Cutter:
    """Ends the bot's connections at one named step; remembers how many it ended there."""

    def __init__(self, postgres_url: str, step: str) -> None:
        self.url, self.schema, self.step = postgres_url, schema_of(postgres_url), step
        self.ended: list[int] = []

    def cut_now(self, at: str) -> None:
        if at == self.step:
            self.ended.append(terminate_backends(self.url, self.schema))

    async def cut(self, at: str) -> None:
        await asyncio.to_thread(self.cut_now, at)


async def deliver(app: App, msg: IncomingMessage) -> None:
    """Deliver as a platform does: an error answer (the adapter's 5xx) means the same event again."""
    for _ in range(10):
        try:
            await app.core.accept_message(msg)
            return
        except StorageError:
            continue
    raise AssertionError("the message was never accepted")


async def click(app: App, approval_id: str) -> None:
    for _ in range(10):
        try:
            await app.core.decide(DecisionRequest(approval_id, ALICE, approve=True))
            return
        except StorageError:
            continue
    raise AssertionError("the click was never recorded")


@pytest.mark.parametrize("step", STEPS)
async def test_connections_ended_at_each_step_of_a_turn(bots, model, postgres_url, step):
    cutter = Cutter(postgres_url, step)
    stages = Stages(during_write=lambda: cutter.cut("during_tool"))

    def respond(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["role"] == "tool":
            cutter.cut_now("after_tool")
            return text("Stored.", delay=0.2)
        cutter.cut_now("model_call")
        return calls(("store_note", {"topic": "x"}), delay=0.2)

    model.responder = respond
    app = await bots.start(toolsets=[stages.toolset()], database_url=postgres_url, CHATOPS_LEASE_SECONDS="3")
    channel = FaultChannel()
    channel.before_card = lambda: cutter.cut("card_post")
    channel.before_reply = lambda: cutter.cut("answer_post")
    app.ctx.channels[channel.platform] = channel
    await bots.run(app)

    await cutter.cut("ack")
    await deliver(app, message("store a note about x"))
    await channel.wait_for(lambda: bool(channel.cards), timeout=60)
    (approval_id,) = await pending_ids(app)
    await cutter.cut("decision")
    await click(app, approval_id)
    await channel.wait_for(lambda: "Stored." in channel.replies, timeout=60)
    await settle(app)

    assert cutter.ended and cutter.ended[0] > 0, "the fault was never injected"
    assert stages.runs == [approval_id]  # exactly once
    state = await summary(app)
    assert state.approvals == {approval_id: "succeeded"}
    assert state.stuck == [] and state.runs["done"] == 1
    assert channel.replies.count("Stored.") == 1


def backend_pids(postgres_url: str) -> list[int]:
    """The server processes of the bot's connections (application_name = the test schema)."""
    engine = sa.create_engine(sa.make_url(postgres_url.split("?")[0]).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :a AND pid <> pg_backend_pid()")
            return [int(pid) for pid in conn.execute(query, {"a": schema_of(postgres_url)}).scalars()]
    finally:
        engine.dispose()


@asynccontextmanager
async def server_processes_stopped(postgres_url: str) -> AsyncIterator[list[int]]:
    """Every server process of the bot's connections stopped (SIGSTOP: alive, its socket open, never
    answering) for the block, and let go again (SIGCONT) after it, whatever happens."""
    stopped = await asyncio.to_thread(backend_pids, postgres_url)
    assert stopped, "the bot has no connection to stop"
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield stopped
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


async def test_server_processes_that_stop_answering_are_given_up_and_the_bot_goes_on(bots, model, postgres_url):
    """Every server process of the bot is stopped (SIGSTOP: alive, its socket open, never answering):
    the next transaction waited forever and the conversation stalled without a word. Now it is given
    up after its bound, the ack fails (the platform delivers again), the pool starts afresh, and the
    redelivered message is answered, while those processes are still stopped."""
    model.script(text("one"), text("two"))
    app = await bots.start(database_url=postgres_url, CHATOPS_DB_STALL_SECONDS="2")
    channel = FaultChannel()
    app.ctx.channels[channel.platform] = channel
    await bots.run(app)
    await deliver(app, message("hi"))
    await channel.wait_for(lambda: "one" in channel.replies, timeout=60)
    await settle(app)

    async with server_processes_stopped(postgres_url) as stopped:
        again = message("hi again")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StorageError):  # a clear answer (the adapter's 503), not a wait without end
            async with asyncio.timeout(60):
                await app.core.accept_message(again)
        # The 2 s bound, with room for a loaded machine. A cancelled statement let psycopg wait 5 s more
        # on the stopped process (7 s: Slack had long given up and delivered again).
        took = loop.time() - started
        assert took < 5.0, f"the ack was refused after {took:.1f}s"
        await deliver(app, again)  # the platform's redelivery: fresh connections
        await channel.wait_for(lambda: "two" in channel.replies, timeout=60)
        assert set(stopped) <= set(await asyncio.to_thread(backend_pids, postgres_url))  # still there, still stopped
    await settle(app)
    state = await summary(app)
    assert state.stuck == [] and state.runs["done"] == 2


HELD = "CREATE TABLE held (id integer PRIMARY KEY, n integer NOT NULL); INSERT INTO held VALUES (1, 0)"
BUMP = sa.text("UPDATE held SET n = n + 1 WHERE id = 1")


def _direct(postgres_url: str) -> sa.Engine:
    """An engine of the test's own, beside the bot's (same schema)."""
    return sa.create_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))


def _lock_waiters(postgres_url: str) -> int:
    """How many of the bot's server processes wait on a lock."""
    engine = _direct(postgres_url.split("?")[0])
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :a AND wait_event_type = 'Lock'")
            return int(conn.execute(query, {"a": schema_of(postgres_url)}).scalar_one())
    finally:
        engine.dispose()


async def _until(predicate: Callable[[], Any], timeout: float) -> None:
    """Wait (bounded) until the database says `predicate()`, asked again every 50 ms."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(predicate):
            await asyncio.sleep(0.05)


async def test_a_transaction_given_up_while_it_waits_for_a_lock_leaves_the_lock_queue(postgres_url, caplog):
    """A transaction waiting on a row lock is given up at its bound and its connection dropped; its
    server process, though, went on waiting in the lock's queue until the holder let go (then ran
    the statement for nobody, ahead of every live waiter queued behind it). Now the process is ended
    from a fresh connection (`pg_terminate_backend`), and the log names its pid, nothing more."""
    from storage.engine import Database, TransactionStalled

    blocker = _direct(postgres_url)
    with blocker.begin() as conn:
        conn.exec_driver_sql(HELD)
    db = Database(postgres_url, stall=1.0)
    holder = blocker.connect()
    holder.execute(BUMP)  # the row's lock, held by the test until the end
    try:
        with pytest.raises(TransactionStalled):
            await db.run(lambda s: s.execute(BUMP), deadline=0.5)  # one attempt, given up after 1 s
        # The waiter gone, and the log line written (it comes after the end's COMMIT; CI once looked
        # between the two, and `dispose` cancels an end still under way).
        await _until(lambda: _lock_waiters(postgres_url) == 0 and "stalled connection was ended" in caplog.text, timeout=10)
    finally:
        holder.rollback()
        holder.close()
        blocker.dispose()
        await db.dispose()
    assert "postgresql://" not in caplog.text


async def test_a_transaction_whose_client_vanished_frees_its_row_locks_within_the_bound(postgres_url):
    """A client that vanished in the middle of a transaction (a network partition: nothing it says,
    not even its close, reaches the server) left its server process idle in the transaction, holding
    its row locks until TCP noticed, hours later; every writer of those rows waited. Ending it from a
    fresh connection cannot help when that connection goes the same dead way. Now every connection
    tells its server process to end a session idle inside a transaction for longer than the stall
    bound (`idle_in_transaction_session_timeout`): the next writer gets the lock within it."""
    from storage.engine import Database, TransactionStalled
    from tests.fakes.tcp_proxy import TcpProxy

    direct = _direct(postgres_url)
    with direct.begin() as conn:
        conn.exec_driver_sql(HELD)
    url = sa.make_url(postgres_url)
    async with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        db = Database(url.set(port=proxy.port).render_as_string(hide_password=False), stall=1.0)

        async def bump_then_vanish(session: Any) -> None:
            await session.execute(BUMP)
            proxy.freeze()
            await session.execute(sa.text("SELECT 1"))  # never reaches the server

        try:
            with pytest.raises(TransactionStalled):
                await db.run(bump_then_vanish, deadline=0.5)
            loop = asyncio.get_running_loop()
            started = loop.time()

            def bump_directly() -> None:
                with direct.begin() as conn:
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '20s'")
                    conn.execute(BUMP)

            await asyncio.to_thread(bump_directly)  # before: LockNotAvailable after 20 s
            took = loop.time() - started
        finally:
            proxy.thaw()
            await db.dispose()
            direct.dispose()
    # The 1 s bound (and 1 s of backstop), with room for a loaded machine.
    assert took < 8.0, f"the lock was free after {took:.1f}s"
