"""Two replicas behind one Slack app: deliveries and clicks land on either, and everything still runs once.

Each replica is a full bot (its own HTTP server, Slack adapter and database engine) on the same
database, as when several instances sit behind a load balancer or share Socket Mode connections.
"""

from __future__ import annotations

import asyncio
import random

from tests.fakes.openai_server import calls, text
from tests.slack_helpers import (  # noqa: F401 - fixtures
    approval_id_of,
    card_message,
    click,
    fake_slack_fixture,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

EVENTS = 50


async def settle_all(replicas) -> None:
    while any(len(r.app.ctx.tasks) or r.adapter._tasks for r in replicas):
        for replica in replicas:
            await replica.settle()


async def test_retries_spread_over_two_replicas_run_each_event_once(slack_bot, fake_slack, model, db_url):
    model.responder = lambda body: text("done")
    replicas = [await slack_bot(database_url=db_url), await slack_bot(database_url=db_url)]
    events = [mention(f"task {i}", ts=next_ts()) for i in range(EVENTS)]
    deliveries = [(event, retry) for event in events for retry in (None, 1, 2, 3)]
    rng = random.Random(11)
    rng.shuffle(deliveries)
    gate = asyncio.Semaphore(16)

    async def deliver(event: dict, retry: int | None) -> int:
        """Like Slack: a 5xx answer (the database was busy) is delivered again, to any replica."""
        async with gate:
            for attempt in range(30):
                status = (await rng.choice(replicas).send(event, retry_num=retry if attempt == 0 else attempt))[0]
                if status < 500:
                    return status
            return status

    assert set(await asyncio.gather(*(deliver(e, r) for e, r in deliveries))) == {200}
    await settle_all(replicas)
    assert await replicas[0].count("inbox_event") == EVENTS
    assert await replicas[0].count("run") == EVENTS
    assert len(model.requests) == EVENTS
    assert len(replicas[0].replies()) == EVENTS


async def test_simultaneous_clicks_on_two_replicas_run_the_tool_once(slack_bot, fake_slack, model, db_url):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "ops", "text": "x"})), text("Stored."))
    tools = [notes_toolset(ledger)]
    first, second = await slack_bot(toolsets=tools, database_url=db_url), await slack_bot(toolsets=tools, database_url=db_url)
    await first.send(mention("write a note"))
    await first.settle()
    card = card_message(fake_slack)
    approval_id = approval_id_of(card)

    payload = click(card)
    statuses = await asyncio.gather(*(replica.send(payload) for replica in (first, second) * 4))
    assert {s for s, _ in statuses} == {200}
    await settle_all([first, second])
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
    assert len(fake_slack.calls_to("chat.postEphemeral")) == 7
    assert [r["text"] for r in first.replies()] == [
        "Asked for approval of 1 action(s): see the card(s) below.",
        "Stored.",
    ]  # the pause line above the card, the answer below it
