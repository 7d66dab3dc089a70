"""Socket Mode: the same Bolt app and listeners, reached through a real WebSocket from the fake Slack.

`apps.connections.open` (called with the app token) returns the fake's `ws://` URL; envelopes pushed
there are handled by Bolt's own Socket Mode adapter and acknowledged only once they were recorded.
"""

from __future__ import annotations

import sqlite3

from tests.fakes.openai_server import calls, text
from tests.slack_helpers import (  # noqa: F401 - fixtures
    APP_TOKEN,
    CHANNEL,
    approval_id_of,
    card_message,
    click,
    fake_slack_fixture,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset


async def test_socket_mode_runs_the_whole_flow_through_the_same_handlers(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "ops", "text": "x"})), text("Stored."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)], socket=True)
    await fake_slack.wait_connected()
    (opened,) = fake_slack.calls_to("apps.connections.open")
    assert opened.token == APP_TOKEN
    assert bot.adapter.mode == "socket" and bot.adapter.routes() == []  # no HTTP door in Socket Mode

    root = next_ts()
    event = mention("write a note", ts=root)
    first = await fake_slack.push("events_api", event)
    assert await fake_slack.wait_ack(first) is not None
    retried = await fake_slack.push("events_api", event, retry_attempt=1, retry_reason="timeout")
    assert await fake_slack.wait_ack(retried) is not None
    await bot.settle()
    assert await bot.count("inbox_event") == 1  # the retry was recognised, not run again
    card = card_message(fake_slack)
    assert (card["channel"], card["thread_ts"]) == (CHANNEL, root)
    approval_id = approval_id_of(card)

    envelope = await fake_slack.push("interactive", click(card))
    assert await fake_slack.wait_ack(envelope) is not None
    await bot.settle()
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
    assert bot.replies()[-1]["text"] == "Stored."
    assert "Approved by" in str(fake_slack.messages[card["ts"]]["blocks"])


async def test_socket_mode_leaves_an_unrecorded_event_unacknowledged_and_processes_its_redelivery(slack_bot, fake_slack, model):
    model.script(text("done"))
    bot = await slack_bot(socket=True)
    await fake_slack.wait_connected()
    database = bot.app.settings.database_url.removeprefix("sqlite:///")
    event = mention("do it", ts=next_ts())

    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE seen_key RENAME TO seen_key_gone")
    envelope = await fake_slack.push("events_api", event)
    assert await fake_slack.wait_ack(envelope, timeout=1.5) is None  # no ack: Slack redelivers
    await bot.settle()
    assert model.requests == []

    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE seen_key_gone RENAME TO seen_key")
    envelope = await fake_slack.push("events_api", event, retry_attempt=1, retry_reason="timeout")
    assert await fake_slack.wait_ack(envelope) is not None
    await bot.settle()
    assert await bot.count("inbox_event") == 1
    assert bot.replies()[-1]["text"] == "done"
