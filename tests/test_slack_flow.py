"""Slack end to end: signed requests to the real `/slack/events`, the real Web API client talking to a
fake Slack, a scripted model. Mention -> card -> click -> tool -> card update -> reply in the thread."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.core import texts
from bot.slack.events import REJECT_VIEW, VIEW_ACTION
from storage.models import Approval, AuditEvent, utcnow
from tests.fakes.openai_server import calls, last_user_text, text, tool_results
from tests.slack_helpers import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    CHANNEL,
    DM,
    approval_id_of,
    card_message,
    click,
    dm,
    fake_slack_fixture,
    mention,
    next_ts,
    reject_submission,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

NOTE = ("write_note", {"topic": "ops", "text": "restart <!channel> *web-1*"})


def all_text(blocks: list[dict]) -> str:
    return json.dumps(blocks, ensure_ascii=False)


def decision_buttons(blocks: list[dict]) -> list[str]:
    """Approve/Reject buttons left on a card (the "View full request" button always stays)."""
    return [e["action_id"] for b in blocks if b["type"] == "actions" for e in b["elements"] if e["action_id"] != VIEW_ACTION]


async def audit_kinds(app) -> list[tuple[str, str | None]]:
    async with app.ctx.db.transaction() as session:
        rows = (await session.execute(sa.select(AuditEvent).order_by(AuditEvent.seq))).scalars().all()
        return [(r.kind, r.status) for r in rows]


async def approval_status(app, approval_id: str) -> str:
    async with app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None
        return row.status


async def test_mention_card_approve_runs_the_tool_updates_the_card_and_answers_in_the_thread(
    slack_bot, fake_slack, model, db_url
):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored the note."))
    fake_slack.add_user(ALICE, "Alice")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)], database_url=db_url)
    root = next_ts()

    assert (await bot.send(mention("please write a note", ts=root)))[0] == 200
    await bot.settle()
    (reaction,) = fake_slack.calls_to("reactions.add")
    assert reaction.params == {"channel": CHANNEL, "timestamp": root, "name": "eyes"}
    assert last_user_text(model.requests[0]) == "please write a note"  # the bot's mention is stripped
    card = card_message(fake_slack)
    assert (card["channel"], card["thread_ts"]) == (CHANNEL, root)
    pending = json.loads(json.dumps(card["blocks"]))
    assert pending[0] == {"type": "header", "text": {"type": "plain_text", "text": "Approval needed", "emoji": False}}
    buttons = pending[-1]["elements"]
    assert [(b["action_id"], b.get("style")) for b in buttons] == [
        ("chatops_approve", "primary"),
        ("chatops_reject", "danger"),
        ("chatops_edit", None),
        ("chatops_view_full", None),
    ]
    value_blocks = [b["text"] for b in pending if b["type"] == "section" and "text" in b]
    assert {"type": "plain_text", "text": "▸ text:\n│ restart <!channel> *web-1*", "emoji": False} in value_blocks  # exact, inert
    assert f"<@{ALICE}>" in all_text(pending)
    assert ledger.effects == []

    assert (await bot.send(click(card)))[0] == 200
    await bot.settle()
    assert [e["approval_id"] for e in ledger.effects] == [approval_id_of({"blocks": pending})]
    decided = fake_slack.messages[card["ts"]]["blocks"]
    assert decision_buttons(decided) == []
    assert f"Approved by {ALICE.lower()} at" in all_text(decided)
    assert "Done: note 1 stored" in all_text(decided)
    assert tool_results(model.requests[-1]) == ["note 1 stored"]
    final = bot.replies()[-1]
    assert (final["text"], final["channel"], final["thread_ts"]) == ("Stored the note.", CHANNEL, root)
    assert fake_slack.calls_to("chat.postEphemeral") == []
    kinds = await audit_kinds(bot.app)
    for expected in [
        ("request_received", "queued"),
        ("card_posted", "posted"),
        ("approval_decided", "approved"),
        ("tool_executed", "succeeded"),
        ("reply_posted", "done"),
    ]:
        assert expected in kinds


async def test_reject_opens_a_modal_and_the_reason_reaches_the_card_and_the_model(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("OK, I did not write it."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    root = next_ts()
    await bot.send(mention("write a note", ts=root))
    await bot.settle()
    card = card_message(fake_slack)
    approval_id = approval_id_of(card)

    reject = click(card, approve=False)
    assert (await bot.send(reject))[0] == 200
    (opened,) = await fake_slack.wait_for("views.open")
    assert opened.params["trigger_id"] == reject["trigger_id"]
    view = opened.params["view"]
    assert view["callback_id"] == REJECT_VIEW
    assert await approval_status(bot.app, approval_id) == "pending"  # the click alone decides nothing

    status, body = await bot.send(reject_submission(view, "  wrong topic, use b  "))
    assert (status, body) == (200, "")  # empty answer: the modal closes
    await bot.settle()
    assert ledger.effects == []
    assert await approval_status(bot.app, approval_id) == "rejected"
    decided = fake_slack.messages[card["ts"]]["blocks"]
    assert f"Rejected by {ALICE.lower()}: wrong topic, use b" in all_text(decided)
    assert decision_buttons(decided) == []
    assert "wrong topic, use b" in tool_results(model.requests[-1])[0]
    assert bot.replies()[-1]["text"] == "OK, I did not write it."


async def test_a_click_by_someone_else_is_refused_privately_and_changes_nothing(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE))
    fake_slack.add_user(ALICE, "Alice")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("write a note"))
    await bot.settle()
    card = card_message(fake_slack)
    approval_id = approval_id_of(card)
    updates_before = len(fake_slack.calls_to("chat.update"))

    assert (await bot.send(click(card, user=BOB)))[0] == 200
    await bot.settle()
    (ephemeral,) = fake_slack.calls_to("chat.postEphemeral")
    assert ephemeral.params["user"] == BOB and ephemeral.params["channel"] == CHANNEL
    assert ephemeral.params["text"] == "You cannot decide this request: only Alice, who asked, can decide this."
    assert len(fake_slack.calls_to("chat.update")) == updates_before
    assert ledger.effects == [] and await approval_status(bot.app, approval_id) == "pending"
    assert ("click_refused", "not_allowed") in await audit_kinds(bot.app)

    # Bob's reject through the modal is refused inside the modal, and the approval stays pending.
    await bot.send(click(card, user=BOB, approve=False))
    (opened,) = await fake_slack.wait_for("views.open")
    status, body = await bot.send(reject_submission(opened.params["view"], "no", user=BOB))
    assert status == 200
    assert json.loads(body)["response_action"] == "errors"
    assert await approval_status(bot.app, approval_id) == "pending"


@pytest.mark.parametrize("clicks", [2, 10])
async def test_rapid_double_clicks_run_the_tool_exactly_once(slack_bot, fake_slack, model, db_url, clicks):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)], database_url=db_url)
    await bot.send(mention("write a note"))
    await bot.settle()
    card = card_message(fake_slack)

    statuses = await asyncio.gather(*(bot.send(click(card)) for _ in range(clicks)))  # all in flight together
    assert [s for s, _ in statuses] == [200] * clicks
    await bot.settle()
    assert len(ledger.effects) == 1
    ephemerals = fake_slack.calls_to("chat.postEphemeral")
    assert len(ephemerals) == clicks - 1
    # Each other clicker is told the truth: it was already decided, or (a click that found SQLite's lock
    # busy past its budget on a loaded machine: seen once in ten at once) that it was not recorded.
    assert all("already" in e.params["text"] or e.params["text"] == texts.CLICK_NOT_RECORDED for e in ephemerals)
    assert bot.replies()[-1]["text"] == "Stored."


async def test_a_click_after_expiry_runs_nothing_and_says_so(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("The approval expired, so nothing was written."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("write a note"))
    await bot.settle()
    card = card_message(fake_slack)
    bot.app.ctx.clock = lambda: utcnow() + timedelta(days=3)

    assert (await bot.send(click(card)))[0] == 200
    await bot.settle()
    (ephemeral,) = fake_slack.calls_to("chat.postEphemeral")
    assert ephemeral.params["text"].startswith("This request expired at")
    assert ledger.effects == []
    decided = fake_slack.messages[card["ts"]]["blocks"]
    assert "Expired at" in all_text(decided) and decision_buttons(decided) == []
    assert bot.replies()[-1]["text"] == "The approval expired, so nothing was written."


async def test_a_dm_is_a_conversation_answered_in_the_dm(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("Done."), text("You're welcome."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(dm("write a note"))
    await bot.settle()
    card = card_message(fake_slack)
    assert (card["channel"], card["thread_ts"]) == (DM, None)
    await bot.send(click(card))
    await bot.settle()
    assert len(ledger.effects) == 1
    await bot.send(dm("thanks"))
    await bot.settle()
    replies = bot.replies()
    assert [(r["text"], r["channel"], r["thread_ts"]) for r in replies] == [
        ("Asked for approval of 1 action(s): see the card(s) below.", DM, None),
        ("Done.", DM, None),
        ("You're welcome.", DM, None),
    ]
    # Both DM messages belong to one conversation: the model saw the earlier turn.
    assert "write a note" in json.dumps(model.requests[-1]["messages"])


async def test_own_and_other_bots_messages_edits_and_channel_chatter_are_ignored(slack_bot, fake_slack, model):
    bot = await slack_bot()
    ignored = [
        dm("from a bot", bot_id="B0OTHER", subtype="bot_message"),
        dm("from myself", user="U0BOT"),
        dm("edited", subtype="message_changed"),
        dm("plain channel message", channel=CHANNEL, channel_type="channel"),
    ]
    for payload in ignored:
        assert (await bot.send(payload))[0] == 200
    await bot.settle()
    assert await bot.count("inbox_event") == 0
    assert model.requests == []


async def test_one_message_delivered_as_mention_and_dm_event_runs_once(slack_bot, fake_slack, model):
    model.script(text("hello"))
    bot = await slack_bot()
    ts = next_ts()
    both = [mention("hi", channel=DM, ts=ts), dm("<@U0BOT> hi", ts=ts)]
    for payload in both:
        assert (await bot.send(payload))[0] == 200
    await bot.settle()
    assert await bot.count("inbox_event") == 1
    assert len(model.requests) == 1


async def test_events_the_bot_does_not_use_are_acknowledged_so_slack_does_not_retry_them(slack_bot, model):
    bot = await slack_bot()
    status, _ = await bot.send({**mention("x"), "event": {"type": "reaction_added", "user": ALICE, "reaction": "tada"}})
    assert status == 200
    assert await bot.count("inbox_event") == 0
