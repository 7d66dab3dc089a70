"""SQLite write lock held by another process (`BEGIN IMMEDIATE` in a separate Python), and the SQLite
file made read-only from outside (`chattr +i`) for a few seconds, during a turn and during a write
tool, with the Slack adapter in HTTP mode: acks and `/healthz` answer within a generous bound, a
delivery that could not be recorded is refused with 5xx, its redelivery afterwards is processed
exactly once, and the turn (and the execution's record: sent is recorded as sent) completes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_server import calls, text
from tests.fault_helpers import LockHolder, ReadOnlyFile, Stages, settle, summary
from tests.slack_helpers import SlackBot, approval_id_of, card_message, click, fake_slack_fixture, mention, slack_bot_fixture

__all__ = ["fake_slack_fixture", "slack_bot_fixture"]
BOUND = 1.5  # seconds: a generous bound (Slack gives up after 3 s)
READ_ONLY_SECONDS = 3.0  # how long the file stays unwritable: the fault's length, not a wait for the bot


def database_path(bot: SlackBot) -> str:
    return bot.app.settings.database_url.removeprefix("sqlite:///")


async def timed_healthz(bot: SlackBot) -> tuple[int, float]:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{bot.app.port}/healthz") as response:
        return response.status, time.perf_counter() - started


async def db_retries(bot: SlackBot) -> float:
    """`chatops_db_retries_total` from the bot's /metrics: database steps attempted again after a fault."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{bot.app.port}/metrics") as response:
        body = await response.text()
    families = text_string_to_metric_families(body)
    return sum(s.value for f in families if f.name == "chatops_db_retries" for s in f.samples if s.name.endswith("_total"))


async def timed_send(bot: SlackBot, payload: dict, **kwargs) -> tuple[int, float]:
    started = time.perf_counter()
    status, _ = await bot.send(payload, **kwargs)
    return status, time.perf_counter() - started


async def check_fast_answers_while_locked(bot: SlackBot) -> dict:
    """While the lock is held: /healthz is fast, a new event is refused fast (5xx, so Slack redelivers)."""
    status, took = await timed_healthz(bot)
    assert status == 200 and took < BOUND, (status, took)
    refused = mention("second question")
    status, took = await timed_send(bot, refused)
    assert status >= 500 and took < BOUND, (status, took)
    return refused


@pytest.fixture
async def holder(request):
    holders: list[LockHolder] = []

    def make(path: str) -> LockHolder:
        holders.append(LockHolder(path))
        return holders[-1]

    yield make
    for h in holders:
        h.kill()


async def test_a_lock_held_during_a_turn_delays_it_but_acks_stay_fast_and_nothing_is_lost(slack_bot, model, holder):
    in_flight = asyncio.Event()

    def respond(body):
        question = body["messages"][-1]["content"]
        if "first" in question:
            in_flight.set()
            return text("first answer", delay=0.5)
        return text("second answer")

    model.responder = respond
    bot = await slack_bot()
    lock = holder(database_path(bot))
    status, took = await timed_send(bot, mention("first question"))
    assert status == 200 and took < BOUND
    await in_flight.wait()
    await lock.hold()  # the run's next write (its answer) now waits for another process
    refused = await check_fast_answers_while_locked(bot)
    await lock.release()
    status, _ = await bot.send(refused, retry_num=1)  # Slack's redelivery of the refused event
    assert status == 200
    await bot.fake.wait_for("chat.postMessage", count=2, timeout=60)
    await bot.settle()
    await settle(bot.app)
    assert sorted(r["text"] for r in bot.replies()) == ["first answer", "second answer"]
    assert await bot.count("inbox_event") == 2
    assert [len([r for r in model.requests if "second" in r["messages"][-1]["content"]])] == [1]
    assert (await summary(bot.app)).stuck == []


async def test_a_lock_held_during_a_write_tool_delays_its_record_which_lands_once_released(slack_bot, model, holder):
    locked = asyncio.Event()
    stages = Stages()
    model.script(calls(("store_note", {"topic": "x"})), text("Stored."), text("second answer"))
    bot = await slack_bot(toolsets=[stages.toolset()])
    lock = holder(database_path(bot))

    async def hold_the_lock() -> None:
        await lock.hold()
        locked.set()

    stages.during_write = hold_the_lock
    assert (await bot.send(mention("store a note")))[0] == 200
    await bot.fake.wait_for("chat.postMessage", count=2, timeout=60)  # progress line, card
    card = card_message(bot.fake)
    approval_id = approval_id_of(card)
    assert (await bot.send(click(card)))[0] == 200
    await locked.wait()  # the tool ran and returned; its record now waits for the lock
    refused = await check_fast_answers_while_locked(bot)
    await lock.release()
    # "Stored." replaces the run's progress line (posted before the card)
    await bot.fake.wait_until(lambda: "Stored." in [r["text"] for r in bot.replies()], timeout=60)
    assert (await bot.send(refused, retry_num=1))[0] == 200
    await bot.fake.wait_for("chat.postMessage", count=3, timeout=60)  # progress line, card, "second answer"
    await bot.settle()
    await settle(bot.app)
    assert stages.runs == [approval_id]
    state = await summary(bot.app)
    assert state.approvals == {approval_id: "succeeded"} and state.stuck == []
    assert [r["text"] for r in bot.replies()].count("second answer") == 1


@pytest.fixture
async def read_only(tmp_path):
    """Makes the bot's database read-only from outside; always restored, even when a test fails."""
    reason = ReadOnlyFile.available(str(tmp_path))
    if reason is not None:
        pytest.skip(reason)
    made: list[ReadOnlyFile] = []

    def make(path: str) -> ReadOnlyFile:
        made.append(ReadOnlyFile(path))
        return made[-1]

    yield make
    for f in made:
        f.restore_now()


async def test_a_read_only_file_during_a_turn_delays_it_but_acks_stay_fast_and_nothing_is_lost(slack_bot, model, read_only):
    in_flight = asyncio.Event()

    def respond(body):
        question = body["messages"][-1]["content"]
        if "first" in question:
            in_flight.set()
            return text("first answer", delay=0.5)
        return text("second answer")

    model.responder = respond
    bot = await slack_bot()
    fault = read_only(database_path(bot))
    assert (await bot.send(mention("first question")))[0] == 200
    await in_flight.wait()
    retries = await db_retries(bot)
    await fault.make_read_only()  # the run's next write (its answer) fails until the file is writable again
    refused = await check_fast_answers_while_locked(bot)
    await asyncio.sleep(READ_ONLY_SECONDS)
    await fault.restore()
    assert (await bot.send(refused, retry_num=1))[0] == 200  # Slack's redelivery of the refused event
    await bot.fake.wait_for("chat.postMessage", count=2, timeout=60)
    await bot.settle()
    await settle(bot.app)
    assert sorted(r["text"] for r in bot.replies()) == ["first answer", "second answer"]
    assert await bot.count("inbox_event") == 2
    assert (await summary(bot.app)).stuck == []
    assert await db_retries(bot) > retries  # the run's writes met the fault and were attempted again


async def test_a_read_only_file_during_a_write_tool_records_what_was_done_once_writable(slack_bot, model, read_only):
    unwritable = asyncio.Event()
    stages = Stages()
    model.script(calls(("store_note", {"topic": "x"})), text("Stored."), text("second answer"))
    bot = await slack_bot(toolsets=[stages.toolset()])
    fault = read_only(database_path(bot))

    async def make_read_only() -> None:
        await fault.make_read_only()
        unwritable.set()

    stages.during_write = make_read_only
    assert (await bot.send(mention("store a note")))[0] == 200
    await bot.fake.wait_for("chat.postMessage", count=2, timeout=60)  # progress line, card
    card = card_message(bot.fake)
    approval_id = approval_id_of(card)
    assert (await bot.send(click(card)))[0] == 200
    await unwritable.wait()  # the tool ran and returned; its record cannot be written for now
    retries = await db_retries(bot)
    refused = await check_fast_answers_while_locked(bot)
    await asyncio.sleep(READ_ONLY_SECONDS)
    await fault.restore()
    # "Stored." replaces the run's progress line (posted before the card)
    await bot.fake.wait_until(lambda: "Stored." in [r["text"] for r in bot.replies()], timeout=60)
    assert (await bot.send(refused, retry_num=1))[0] == 200
    await bot.fake.wait_for("chat.postMessage", count=3, timeout=60)  # progress line, card, "second answer"
    await bot.settle()
    await settle(bot.app)
    assert stages.runs == [approval_id]
    state = await summary(bot.app)
    assert state.approvals == {approval_id: "succeeded"} and state.stuck == []
    assert [r["text"] for r in bot.replies()].count("second answer") == 1
    assert await db_retries(bot) > retries  # the execution's record met the fault and was attempted again
