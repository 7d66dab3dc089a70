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
BOUND = 2.5  # seconds: the ack budget (1 s) plus room for a loaded CI machine, inside Slack's 3 s
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


class LockFault:
    """Another process holds the write lock while the test looks, then lets go."""

    counts_retries = False  # the bot waits for the lock within one attempt (async polling)

    def __init__(self, path: str) -> None:
        self.holder = LockHolder(path)

    async def begin(self) -> None:
        await self.holder.hold()

    async def end(self) -> None:
        await self.holder.release()

    def clean_up(self) -> None:
        self.holder.kill()


class ReadOnlyFault:
    """The file is made read-only from outside for a few seconds: every write fails meanwhile."""

    counts_retries = True  # each failed write is attempted again (chatops_db_retries_total)

    def __init__(self, path: str) -> None:
        self.file = ReadOnlyFile(path)

    async def begin(self) -> None:
        await self.file.make_read_only()

    async def end(self) -> None:
        await asyncio.sleep(READ_ONLY_SECONDS)  # the fault's length, not a wait for the bot
        await self.file.restore()

    def clean_up(self) -> None:
        self.file.restore_now()


@pytest.fixture(params=["locked", "read-only"])
async def fault(request, tmp_path):
    """A factory: `fault(database_path)` -> the fault this test run injects; always cleaned up."""
    if request.param == "read-only" and (reason := ReadOnlyFile.available(str(tmp_path))) is not None:
        pytest.skip(reason)
    made: list[LockFault | ReadOnlyFault] = []

    def make(path: str) -> LockFault | ReadOnlyFault:
        made.append(LockFault(path) if request.param == "locked" else ReadOnlyFault(path))
        return made[-1]

    yield make
    for f in made:
        f.clean_up()


async def test_a_fault_during_a_turn_delays_it_but_acks_stay_fast_and_nothing_is_lost(slack_bot, model, fault):
    in_flight = asyncio.Event()

    def respond(body):
        question = body["messages"][-1]["content"]
        if "first" in question:
            in_flight.set()
            return text("first answer", delay=0.5)
        return text("second answer")

    model.responder = respond
    bot = await slack_bot()
    injected = fault(database_path(bot))
    status, took = await timed_send(bot, mention("first question"))
    assert status == 200 and took < BOUND
    await in_flight.wait()
    retries = await db_retries(bot)
    await injected.begin()  # the run's next write (its answer) cannot happen for now
    refused = await check_fast_answers_while_locked(bot)
    await injected.end()
    status, _ = await bot.send(refused, retry_num=1)  # Slack's redelivery of the refused event
    assert status == 200
    await bot.fake.wait_until(lambda: sorted(r["text"] for r in bot.replies()) == ["first answer", "second answer"], 60)
    await bot.settle()
    await settle(bot.app)
    assert await bot.count("inbox_event") == 2
    assert [len([r for r in model.requests if "second" in r["messages"][-1]["content"]])] == [1]
    assert (await summary(bot.app)).stuck == []
    if injected.counts_retries:
        assert await db_retries(bot) > retries  # the run's writes met the fault and were attempted again


async def test_a_fault_during_a_write_tool_delays_its_record_which_lands_afterwards(slack_bot, model, fault):
    faulty = asyncio.Event()
    stages = Stages()
    model.script(calls(("store_note", {"topic": "x"})), text("Stored."), text("second answer"))
    bot = await slack_bot(toolsets=[stages.toolset()])
    injected = fault(database_path(bot))

    async def inject() -> None:
        await injected.begin()
        faulty.set()

    stages.during_write = inject
    assert (await bot.send(mention("store a note")))[0] == 200
    await bot.fake.wait_for("chat.postMessage", count=2, timeout=60)  # progress line, card
    card = card_message(bot.fake)
    approval_id = approval_id_of(card)
    assert (await bot.send(click(card)))[0] == 200
    await faulty.wait()  # the tool ran and returned; its record cannot be written for now
    retries = await db_retries(bot)
    refused = await check_fast_answers_while_locked(bot)
    await injected.end()
    # "Stored." replaces the run's progress line (posted before the card): sent is recorded as sent
    await bot.fake.wait_until(lambda: "Stored." in [r["text"] for r in bot.replies()], timeout=60)
    assert (await bot.send(refused, retry_num=1))[0] == 200
    await bot.fake.wait_until(lambda: "second answer" in [r["text"] for r in bot.replies()], timeout=60)
    await bot.settle()
    await settle(bot.app)
    assert stages.runs == [approval_id]
    state = await summary(bot.app)
    assert state.approvals == {approval_id: "succeeded"} and state.stuck == []
    assert [r["text"] for r in bot.replies()].count("second answer") == 1
    if injected.counts_retries:
        assert await db_retries(bot) > retries  # the execution's record met the fault and was attempted again
