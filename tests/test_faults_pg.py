"""PostgreSQL connection loss at each step of a turn: another connection ends every connection of
the bot (`pg_terminate_backend`) right before the message is delivered, while the model call is in
flight, while the card is posted, right before the click, while the write tool runs, after it
(the next model call) and while the answer is posted. The turn must finish, nothing may stay
running, executing or queued, and the tool runs exactly once and is recorded as succeeded."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
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
