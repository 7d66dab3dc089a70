"""Findings of the PostgreSQL chaos campaign (`benchmarks/chaos_pg.py`), each reduced to one test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.core import texts
from bot.core.events import DecisionRequest
from tests.fakes.openai_server import calls, text
from tests.fault_helpers import ALICE as FAULT_ALICE
from tests.fault_helpers import FaultChannel, Stages, message, pending_ids, settle, summary
from tests.slack_helpers import ALICE, card_message, click, fake_slack_fixture, mention, slack_bot_fixture  # noqa: F401 - fixtures
from tests.support_tools import Ledger, notes_toolset
from tests.test_faults_pg import backend_pids, deliver, server_processes_stopped

COUNT = ("count_notes", {"topic": "ops"})
NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
LONG = "\n".join(f"Line {i}: the service web-{i} restarted cleanly and answers health checks." for i in range(60))


async def test_a_stream_broken_by_a_plain_text_500_is_removed_and_the_answer_posted_once(slack_bot, fake_slack, model):
    """Slack's edge answers 5xx with an HTML or plain-text page. The bot read `exc.response.get("error")`
    of such an answer, whose data is a str: AttributeError inside the handler that removes a broken
    stream, so the half-streamed answer stayed in the thread and the outbox posted the answer again."""
    model.script(calls(COUNT), text(LONG))
    fake_slack.server_error("chat.appendStream", times=1)
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("report"))
    await fake_slack.wait_until(lambda: any(m.get("text") == LONG and not m.get("streaming") for m in bot.replies()), timeout=30)
    await bot.settle()
    assert [m["text"] for m in bot.replies()] == [LONG]  # the partial stream was deleted, nothing doubled
    assert len(fake_slack.calls_to("chat.startStream")) == 1


async def test_a_plain_text_500_on_a_reply_is_reported_as_slacks_answer(slack_bot, fake_slack, model, caplog):
    """The outbox names the fault ("Slack answered HTTP 500"), not "AttributeError", and the answer lands."""
    model.script(text("pong"))
    fake_slack.server_error("chat.postMessage", times=1)
    bot = await slack_bot()
    await bot.send(mention("ping"))
    await fake_slack.wait_until(lambda: any(m.get("text") == "pong" for m in bot.replies()), timeout=30)
    await bot.settle()
    assert "AttributeError" not in caplog.text


class Refused(Exception):
    """A step's own failure (a fenced write that lost its version, a check that said no)."""


async def test_a_step_that_fails_while_its_server_process_stops_fails_within_the_bound(postgres_url):
    """A step that raises is rolled back; the ROLLBACK is a round trip outside the transaction's bound,
    so a server process stopped between the step's last statement and its failure held the caller
    until the process ran again (here: for ever, had the test not continued it)."""
    from storage.engine import Database
    from storage.migrate import upgrade

    await asyncio.to_thread(upgrade, postgres_url)
    db = Database(postgres_url, stall=1.0)
    stopped: list[int] = []

    async def step(session):
        await session.execute(sa.text("SELECT 1"))
        stopped.extend(await asyncio.to_thread(backend_pids, postgres_url))
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        raise Refused

    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(Refused):
            async with asyncio.timeout(15):
                await db.run(step)
        took = loop.time() - started
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        await db.dispose()
    assert stopped, "no server process was stopped"
    # A 1 s bound, with room for a loaded machine; before, the caller waited until the process ran again.
    assert took < 5.0, f"the step's failure came back after {took:.1f}s"


async def test_a_click_whose_transaction_stalls_tells_the_clicker_to_click_again(slack_bot, fake_slack, model, postgres_url):
    """Slack never sends a click again, so a click that could not be recorded must say so. A decision
    whose transaction stalled (TransactionStalled, a ConnectionError) was not turned into a StorageError
    as an OperationalError is: it escaped the handler, Bolt answered 500 (Slack puts a warning sign
    on the button, it does not send the click again), the log got an ERROR with a traceback, and the
    clicker was never told that nothing changed, the card still pending."""
    from tests.fakes.tcp_proxy import TcpProxy

    model.script(calls(NOTE), text("Done."))
    fake_slack.add_user(ALICE, "Alice", locale="en-US")
    url = sa.make_url(postgres_url)
    # The database goes quiet behind a frozen link, for the connections the bot holds and for those it
    # opens meanwhile. (Stopping the server processes it held missed a connection the pool opened for
    # the click once its idle ones were taken by stalled background work: the click then simply worked.)
    async with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        env = {"CHATOPS_DB_STALL_SECONDS": "2"}
        bot = await slack_bot(toolsets=[notes_toolset(Ledger())], database_url=proxied, env=env)
        await bot.send(mention("write it down"))
        await fake_slack.wait_for("chat.postMessage", timeout=30)
        await fake_slack.wait_until(
            lambda: any("Approval needed" in str(m.get("blocks")) for m in fake_slack.messages.values()), timeout=30
        )
        card = card_message(fake_slack)
        proxy.freeze()
        try:
            status, _ = await bot.send(click(card))
            assert status == 200  # acknowledged (Slack shows no error); the sentence below says what happened
            await fake_slack.wait_for("chat.postEphemeral", timeout=30)
        finally:
            proxy.thaw()
    (told,) = fake_slack.calls_to("chat.postEphemeral")
    assert told.params["text"] == texts.CLICK_NOT_RECORDED


SLOW_CLAIM_COMMIT = """
CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(4); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_claim AFTER UPDATE ON approval DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.status = 'executing' AND OLD.status = 'approved') EXECUTE FUNCTION slow_claim();
"""


async def test_a_claim_whose_commit_stalled_but_landed_still_runs_the_tool(bots, model, postgres_url):
    """The server is slow to COMMIT the claim approved -> executing (here a deferred trigger sleeps 4 s;
    in production a synchronous standby that lags, an fsync that hangs): the transaction is given up
    at its bound and tried again, but the first COMMIT lands after all. The retry then finds the call
    `executing` under this very replica, takes it for someone else's claim and returns: nobody runs
    the tool, its lease runs out, and the thread is told the outcome is unknown and must be checked by
    hand, for a call that never started."""
    from storage.engine import make_sync_engine, normalise_url

    stages = Stages()
    model.responder = lambda body: (
        text("Stored.") if body["messages"][-1]["role"] == "tool" else calls(("store_note", {"topic": "x"}))
    )
    # The lease outlasts the slow COMMIT (4 s): with a 3 s lease the claim landed already run out, and a
    # loaded machine's sweeper could mark it in doubt before the retry renewed it (CI failed so once).
    app = await bots.start(
        toolsets=[stages.toolset()], database_url=postgres_url, CHATOPS_DB_STALL_SECONDS="2", CHATOPS_LEASE_SECONDS="8"
    )
    channel = FaultChannel()
    app.ctx.channels[channel.platform] = channel
    await bots.run(app)
    engine = make_sync_engine(normalise_url(postgres_url))
    with engine.begin() as conn:
        conn.execute(sa.text(SLOW_CLAIM_COMMIT))
    engine.dispose()

    await deliver(app, message("store a note about x"))
    await channel.wait_for(lambda: bool(channel.cards), timeout=60)
    (approval_id,) = await pending_ids(app)
    await app.core.decide(DecisionRequest(approval_id, FAULT_ALICE, approve=True))
    await channel.wait_for(lambda: any("Stored." in r or "outcome is unknown" in r for r in channel.replies), timeout=60)
    await settle(app)
    state = await summary(app)
    assert stages.runs == [approval_id], channel.replies
    assert state.approvals == {approval_id: "succeeded"}


async def test_a_click_is_answered_within_slacks_three_seconds_while_the_database_stalls(
    slack_bot, fake_slack, model, postgres_url
):
    """Before the decision (an ack's transaction, bounded at 2.5 s), a click looks up the language of the
    card for a clicker whose Slack profile has none: a background read, bounded by
    CHATOPS_DB_STALL_SECONDS (30 s by default, 5 s here) and retried for up to a minute. With the
    server processes stopped, the click's answer came after that bound: Slack had long shown the
    clicker an error on the button, and the decision was then recorded behind their back."""
    model.script(calls(NOTE), text("Done."))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())], database_url=postgres_url, env={"CHATOPS_DB_STALL_SECONDS": "5"})
    await bot.send(mention("write it down"))
    await fake_slack.wait_until(
        lambda: any("Approval needed" in str(m.get("blocks")) for m in fake_slack.messages.values()), timeout=30
    )
    card = card_message(fake_slack)

    async with server_processes_stopped(postgres_url):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await bot.send(click(card))
        took = loop.time() - started
    # The ack's 2.5 s bound, with room for a loaded machine; before, the 5 s background bound and its retries (10 s).
    assert took < 6.0, f"the click was answered after {took:.1f}s"


class RowHolder:
    """A server process that locks the run's answer job row (`FOR UPDATE`), then stops (SIGSTOP)
    holding it, until `release()`: in the campaign, this replica's own mark, given up as stalled."""

    def __init__(self, postgres_url: str) -> None:
        self.engine = sa.create_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))
        self.conn: sa.Connection | None = None
        self.pid = 0

    def lock_and_stop(self) -> None:
        if self.pid:  # once: a second reply must not leave a stopped process behind, unknown to release()
            return
        self.conn = self.engine.connect()
        held = self.conn.execute(sa.text("SELECT id FROM outbox_job WHERE kind = 'answer' FOR UPDATE")).all()
        assert len(held) == 1, held
        self.pid = int(self.conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        os.kill(self.pid, signal.SIGSTOP)

    def release(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGCONT)
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
        self.engine.dispose()


async def test_an_answer_whose_sent_mark_meets_a_stopped_lock_holder_is_posted_once(bots, model, postgres_url):
    """The answer was posted; its "sent" mark then waited on the job row's lock, which a stopped server
    process held for longer than the retry deadline (in the campaign: this replica's own earlier mark,
    given up as stalled; dropping a connection does not free its locks while its process is stopped).
    The mark was given up, the claim ran out, and once the lock was free another replica claimed the
    job and posted the answer a second time (12 of 120 conversations). Now a mark never waits on the
    row's lock: the row locked, it is recorded beside it (`outbox_sent`), no claim takes a job so
    recorded, and the sweeper folds it into the row once the row is free."""
    from bot.core.outbox import CLAIM_SECONDS
    from storage.engine import RETRY_DEADLINE
    from storage.models import OutboxSent, utcnow

    model.script(text("one"))
    here = await bots.start(database_url=postgres_url, CHATOPS_DB_STALL_SECONDS="2", CHATOPS_SWEEP_INTERVAL="3600")
    other = await bots.start(database_url=postgres_url, CHATOPS_SWEEP_INTERVAL="3600")
    mine, theirs = FaultChannel(), FaultChannel()
    for app, channel in ((here, mine), (other, theirs)):
        app.ctx.channels[channel.platform] = channel
        await bots.run(app)
    holder = RowHolder(postgres_url)
    mine.before_reply = lambda: asyncio.to_thread(holder.lock_and_stop)
    try:
        await deliver(here, message("hi"))
        await mine.wait_for(lambda: "one" in mine.replies, timeout=30)
        # Its mark is written at once. Before, it was given up after the retry deadline, while this
        # replica's own delivery rounds, its claim run out, queued on the lock too: that wait is bounded.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETRY_DEADLINE + 5):
                await here.ctx.tasks.idle()
        assert holder.pid, "the job's row was never locked"
    finally:
        await asyncio.to_thread(holder.release)
    other.ctx.clock = lambda: utcnow() + timedelta(seconds=CLAIM_SECONDS * 2)  # the claim has long run out
    await other.core.out.deliver_due()
    await settle(here)

    assert mine.replies + theirs.replies == ["one"]
    state = await summary(here)
    assert state.outbox == {"sent": 1}, state.outbox
    records = await here.ctx.db.run(lambda s: s.execute(sa.select(sa.func.count()).select_from(OutboxSent)), read=True)
    assert records.scalar_one() == 0  # folded into the row, then forgotten
