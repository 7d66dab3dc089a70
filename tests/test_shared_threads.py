"""Several people in one thread: each message has its own author, and a call proposed in reply to a
message is its author's request (card, stored requester, audit actor, who may approve). A newer
message supersedes only its own author's pending approvals."""

from __future__ import annotations

import json

import sqlalchemy as sa

from bot.core import texts
from storage.models import Approval, AuditEvent
from tests import feishu_helpers as fh
from tests.fakes.openai_server import calls, text
from tests.feishu_helpers import fake_feishu, feishu_bot
from tests.slack_helpers import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    approval_id_of,
    card_message,
    click,
    fake_slack_fixture,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]  # fixtures


def open_card(fake) -> dict:
    """The newest card that still has its buttons."""
    cards = [m for m in fake.messages.values() if m.get("blocks") and any(b.get("type") == "actions" for b in m["blocks"])]
    assert cards, "no card with buttons"
    return cards[-1]


async def approvals(app) -> list[Approval]:
    async with app.ctx.db.transaction(read=True) as session:
        return list((await session.execute(sa.select(Approval).order_by(Approval.created_at))).scalars().all())


async def actors(app, kind: str) -> list[str | None]:
    async with app.ctx.db.transaction(read=True) as session:
        rows = await session.execute(sa.select(AuditEvent.actor).where(AuditEvent.kind == kind).order_by(AuditEvent.seq))
        return list(rows.scalars().all())


async def test_a_call_proposed_for_bobs_message_is_bobs_request_and_alices_card_stays_valid(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(
        calls(("write_note", {"topic": "alice", "text": "from alice"})),
        calls(("write_note", {"topic": "bob", "text": "from bob"})),
        text("Both stored."),
    )
    fake_slack.add_user(ALICE, "Alice")
    fake_slack.add_user(BOB, "Bob")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    root = next_ts()
    assert (await bot.send(mention("note for alice", ts=root)))[0] == 200
    await bot.settle()
    alice_card = card_message(fake_slack)
    alice_id = approval_id_of(alice_card)

    assert (await bot.send(mention("note for bob", user=BOB, thread_ts=root)))[0] == 200
    await bot.settle()
    first = (await approvals(bot.app))[0]
    assert first.status == "pending" and first.requester_id == ALICE  # Bob's message did not cancel Alice's card
    assert texts.WAITING_FOR_OTHERS in [r["text"] for r in bot.replies()]

    assert (await bot.send(click(alice_card, user=BOB)))[0] == 200  # the default rule: only the requester confirms
    await bot.settle()
    assert ledger.effects == []
    assert (await bot.send(click(alice_card, user=ALICE)))[0] == 200
    await bot.settle()
    bob_card = open_card(fake_slack)
    assert approval_id_of(bob_card) != alice_id
    assert f"<@{BOB}>" in json.dumps(bob_card["blocks"]) and f"<@{ALICE}>" not in json.dumps(bob_card["blocks"])
    second = (await approvals(bot.app))[1]
    assert second.requester_id == BOB

    assert (await bot.send(click(bob_card, user=ALICE)))[0] == 200
    await bot.settle()
    assert [e["topic"] for e in ledger.effects] == ["alice"]
    assert (await bot.send(click(bob_card, user=BOB)))[0] == 200
    await bot.settle()
    assert [e["topic"] for e in ledger.effects] == ["alice", "bob"]
    requested = await actors(bot.app, "approval_requested")
    assert [a.split(":")[-1] for a in requested if a] == [ALICE, BOB]
    assert bot.replies()[-1]["text"] == "Both stored."  # the answer is the newest message, below the cards


async def test_a_newer_message_supersedes_only_its_own_authors_pending_card(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(
        calls(("write_note", {"topic": "first", "text": "x"})),
        calls(("write_note", {"topic": "second", "text": "y"})),
    )
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    root = next_ts()
    await bot.send(mention("first note", ts=root))
    await bot.settle()
    await bot.send(mention("no, a second note instead", thread_ts=root))
    await bot.settle()
    first, second = await approvals(bot.app)
    assert (first.status, first.decision_reason) == ("cancelled", texts.SUPERSEDED)
    assert (second.status, second.requester_id) == ("pending", ALICE)
    assert ledger.effects == []


async def test_feishu_two_people_in_one_topic_each_request_is_their_own(feishu_bot, fake_feishu, model):
    """The same on Feishu: Bob's message in Alice's topic waits for her card, then his call is his request."""
    ledger = Ledger()
    model.script(
        calls(("write_note", {"topic": "alice", "text": "from alice"})),
        calls(("write_note", {"topic": "bob", "text": "from bob"})),
        text("Both stored."),
    )
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    assert (await bot.send(fh.at_bot("note for alice", message_id="om_root")))[0] == 200
    await bot.settle()
    alice_id = fh.approval_id_of(bot.card())
    assert (await bot.send(fh.at_bot("note for bob", sender=fh.BOB, root_id="om_root")))[0] == 200
    await bot.settle()
    first = (await approvals(bot.app))[0]
    assert (first.id, first.status, first.requester_id) == (alice_id, "pending", fh.ALICE)

    assert (await bot.send(fh.click(alice_id, operator=fh.BOB)))[0] == 200  # not Bob's to confirm
    await bot.settle()
    assert ledger.effects == []
    assert (await bot.send(fh.click(alice_id, operator=fh.ALICE)))[0] == 200
    await bot.settle()
    second = (await approvals(bot.app))[1]
    assert second.requester_id == fh.BOB and fh.approval_id_of(bot.card()) == second.id
    assert (await bot.send(fh.click(second.id, operator=fh.ALICE)))[0] == 200
    await bot.settle()
    assert [e["topic"] for e in ledger.effects] == ["alice"]
    assert (await bot.send(fh.click(second.id, operator=fh.BOB)))[0] == 200
    await bot.settle()
    assert [e["topic"] for e in ledger.effects] == ["alice", "bob"]
    requested = await actors(bot.app, "approval_requested")
    assert [a.split(":")[-1] for a in requested if a] == [fh.ALICE, fh.BOB]


async def test_a_message_held_behind_a_run_that_is_cancelled_gets_a_run_of_its_own(slack_bot, fake_slack, model):
    model.script(calls(("write_note", {"topic": "alice", "text": "from alice"})), text("Bob's answer."))
    fake_slack.add_user(ALICE, "Alice")
    fake_slack.add_user(BOB, "Bob")
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    root = next_ts()
    assert (await bot.send(mention("note for alice", ts=root)))[0] == 200
    await bot.settle()
    assert (await bot.send(mention("a question from bob", user=BOB, thread_ts=root)))[0] == 200
    await bot.settle()
    assert texts.WAITING_FOR_OTHERS in [r["text"] for r in bot.replies()]  # held behind Alice's card

    assert (await bot.send(mention("cancel", thread_ts=root)))[0] == 200  # Alice stops her run
    await bot.settle()
    await bot.fake.wait_until(lambda: "Bob's answer." in [r["text"] for r in bot.replies()], timeout=30)
    assert (await approvals(bot.app))[0].status == "cancelled"
