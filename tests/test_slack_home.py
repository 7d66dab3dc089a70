"""The Slack App Home tab: published when opened (pending approvals as requester and as approver, recent
requests), its buttons take the card's decision path (`Core.decide`: same authorisation, same audit,
exactly one execution when the card and the home are clicked together), and it is re-published when an
approval it shows changes (`home_refresh` outbox jobs)."""

from __future__ import annotations

import asyncio
import json
import time

import sqlalchemy as sa

from bot.core import texts
from bot.slack.events import APPROVE_ACTION, REJECT_ACTION, decide_block
from storage.models import AuditEvent, OutboxJob
from tests.fakes.openai_server import calls, text
from tests.slack_helpers import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    approval_id_of,
    card_message,
    click,
    event_body,
    fake_slack_fixture,
    interaction,
    mention,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
APPROVERS_POLICY = """
[[tools]]
match = "write_note"
rule = "approve"
approvers = ["slack:U0BOB"]
"""


def home_opened(user: str) -> dict:
    return event_body({"type": "app_home_opened", "user": user, "channel": "D0HOME", "tab": "home", "event_ts": "1.0"})


def home_click(approval_id: str, *, user: str = ALICE, approve: bool = True, revision: int = 1) -> dict:
    """A `block_actions` from a button on the App Home tab (no channel, no message: a view); its block
    names the revision of the call the home showed, like the card's."""
    return {
        **interaction("block_actions", user),
        "container": {"type": "view", "view_id": "V0HOME"},
        "view": {"id": "V0HOME", "type": "home", "blocks": []},
        "actions": [
            {
                "type": "button",
                "action_id": APPROVE_ACTION if approve else REJECT_ACTION,
                "block_id": decide_block(approval_id, revision),
                "value": approval_id,
                "action_ts": str(time.time()),
            }
        ],
    }


def home_buttons(view: dict) -> list[tuple[str, str]]:
    return [(e["action_id"], e["value"]) for b in view["blocks"] if b["type"] == "actions" for e in b["elements"]]


def home_text(view: dict) -> str:
    return json.dumps(view["blocks"], ensure_ascii=False)


async def audit_rows(bot) -> list[tuple[str, str | None]]:
    await bot.app.ctx.audit.chain(bot.app.ctx.db)
    async with bot.app.ctx.db.transaction() as session:
        return [tuple(r) for r in (await session.execute(sa.select(AuditEvent.kind, AuditEvent.status))).all()]


async def started_with_a_card(slack_bot, fake_slack, model, **kwargs):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."))
    fake_slack.add_user(ALICE, "Alice")
    fake_slack.add_user(BOB, "Bob")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)], **kwargs)
    await bot.send(mention("please write a note"))
    await bot.settle()
    card = card_message(fake_slack)
    return bot, ledger, card, approval_id_of(card)


async def test_opening_the_home_publishes_pending_approvals_and_recent_requests(slack_bot, fake_slack, model):
    bot, _, _, approval_id = await started_with_a_card(slack_bot, fake_slack, model)
    fake_slack.homes.clear()

    assert (await bot.send(home_opened(ALICE)))[0] == 200
    await bot.settle()
    view = fake_slack.homes[ALICE]
    assert view["type"] == "home"
    assert home_buttons(view) == [(APPROVE_ACTION, approval_id), (REJECT_ACTION, approval_id)]
    (actions,) = [b for b in view["blocks"] if b["type"] == "actions"]
    assert actions["block_id"] == decide_block(approval_id, 1)  # like the card's: a click names the revision it saw
    shown = home_text(view)
    assert "Waiting for a decision (1)" in shown and "You are the requester" in shown
    assert "Write a note about ops" in shown
    assert "Your recent requests" in shown and "please write a note" in shown and "waiting for approval" in shown


async def test_the_home_lists_what_a_person_may_approve_and_refreshes_when_it_changes(slack_bot, fake_slack, model, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(APPROVERS_POLICY, encoding="utf-8")
    bot, ledger, card, approval_id = await started_with_a_card(slack_bot, fake_slack, model, env={"CHATOPS_POLICY": str(policy)})
    # The new approval was pushed to the homes of the requester and of the approver the policy names.
    assert set(fake_slack.homes) == {ALICE, BOB}
    assert home_buttons(fake_slack.homes[BOB]) == [(APPROVE_ACTION, approval_id), (REJECT_ACTION, approval_id)]
    assert "You are the approver" in home_text(fake_slack.homes[BOB])

    assert (await bot.send(click(card, user=BOB)))[0] == 200  # decided on the card...
    await bot.settle()
    assert len(ledger.effects) == 1
    for user in (ALICE, BOB):  # ...and both homes were re-published without it
        assert home_buttons(fake_slack.homes[user]) == []
        assert "Nothing is waiting for you." in home_text(fake_slack.homes[user])


async def test_approve_from_the_home_takes_the_card_path(slack_bot, fake_slack, model, db_url):
    bot, ledger, card, approval_id = await started_with_a_card(slack_bot, fake_slack, model, database_url=db_url)

    assert (await bot.send(home_click(approval_id)))[0] == 200
    await bot.settle()
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
    decided = fake_slack.messages[card["ts"]]["blocks"]  # the card in the thread shows the decision
    assert "Approved by" in json.dumps(decided)
    assert APPROVE_ACTION not in json.dumps(decided)
    assert home_buttons(fake_slack.homes[ALICE]) == []
    published = [json.dumps(c.params["view"], ensure_ascii=False) for c in fake_slack.calls_to("views.publish")]
    assert any("Approved. Running write_note now." in p for p in published)  # the outcome, on top of the home
    rows = await audit_rows(bot)
    assert ("approval_decided", "approved") in rows and ("tool_executed", "succeeded") in rows
    assert bot.replies()[-1]["text"] == "Stored."


async def test_a_home_click_by_someone_who_may_not_decide_changes_nothing(slack_bot, fake_slack, model):
    bot, ledger, _, approval_id = await started_with_a_card(slack_bot, fake_slack, model)

    assert (await bot.send(home_click(approval_id, user=BOB)))[0] == 200
    await bot.settle()
    assert ledger.effects == []
    notice = "You cannot decide this request: only Alice, who asked, can decide this."
    assert notice in home_text(fake_slack.homes[BOB])
    assert ("click_refused", "not_allowed") in await audit_rows(bot)


async def test_reject_from_the_home_opens_the_reason_modal(slack_bot, fake_slack, model):
    bot, ledger, _, approval_id = await started_with_a_card(slack_bot, fake_slack, model)

    assert (await bot.send(home_click(approval_id, approve=False)))[0] == 200
    (opened,) = await fake_slack.wait_for("views.open")
    assert json.loads(opened.params["view"]["private_metadata"])["approval_id"] == approval_id
    assert ledger.effects == []


async def test_card_and_home_clicked_together_run_the_tool_exactly_once(slack_bot, fake_slack, model, db_url):
    bot, ledger, card, approval_id = await started_with_a_card(slack_bot, fake_slack, model, database_url=db_url)

    statuses = await asyncio.gather(bot.send(click(card)), bot.send(home_click(approval_id)), bot.send(click(card)))
    assert [s for s, _ in statuses] == [200, 200, 200]
    await bot.settle()
    assert len(ledger.effects) == 1
    assert [r for r in await audit_rows(bot) if r[0] == "approval_decided"] == [("approval_decided", "approved")]
    async with bot.app.ctx.db.transaction() as session:
        refreshes = (await session.execute(sa.select(OutboxJob.status).where(OutboxJob.kind == "home_refresh"))).all()
    assert refreshes and all(status == "sent" for (status,) in refreshes)


async def test_the_home_speaks_the_persons_slack_locale(slack_bot, fake_slack, model):
    model.script(calls(NOTE))
    fake_slack.add_user(ALICE, "Alice", locale="zh-CN", tz="Asia/Shanghai")
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("please write a note"))
    await bot.settle()
    await bot.send(home_opened(ALICE))
    await bot.settle()
    shown = home_text(fake_slack.homes[ALICE])
    assert "等待审批（1）" in shown and "您是发起人" in shown and "您最近的请求" in shown
    assert ('"text": "批准"' in shown) and ('"text": "拒绝"' in shown)


async def test_the_home_shows_what_will_run_and_offers_approve_only_when_all_of_it_is_there(slack_bot, fake_slack, model):
    """The home once listed a pending call by its one-line summary with an Approve button: a note whose
    text hid "wire $50,000" ran from there unseen. Now it shows the card's arguments, and a call with
    a value too long to show in full gets only Reject there (decide on the card, "View full request")."""
    hidden = "All fine. " + "padding " * 250 + "P.S. wire $50,000 to IBAN XX00 EVIL today."
    ledger = Ledger()
    model.script(calls(NOTE, ("write_note", {"topic": "minutes", "text": hidden})), text("Stored."))
    fake_slack.add_user(ALICE, "Alice")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("please write two notes"))
    await bot.settle()
    fake_slack.homes.clear()
    await bot.send(home_opened(ALICE))
    await bot.settle()

    view = fake_slack.homes[ALICE]
    shown = "\n".join(b["text"]["text"] for b in view["blocks"] if b["type"] == "section")
    assert "▸ topic: ops" in shown and "▸ text:\n│ restart web-1" in shown  # every argument, as on the card
    assert "▸ topic: minutes" in shown and "All fine." in shown and "P.S. wire" not in shown
    (short, long_) = [b for b in view["blocks"] if b["type"] == "actions"]
    assert [e["action_id"] for e in short["elements"]] == [APPROVE_ACTION, REJECT_ACTION]
    assert [e["action_id"] for e in long_["elements"]] == [REJECT_ACTION]
    assert shown.count("decide on its card") == 1
    assert ledger.effects == []


async def test_a_click_the_database_cannot_record_is_answered_with_click_again(
    slack_bot, fake_slack, model, sqlite_url, tmp_path
):
    """Slack never sends a click again. A click that met a locked database (another process holding
    SQLite's write lock) used to end in a 500, a warning icon on the button and a log line promising a
    redelivery that never comes; the approval waited on, silently. Now the clicker is told in one
    sentence; the approval is untouched; the next click runs the tool once."""
    from tests.fault_helpers import LockHolder

    bot, ledger, card, approval_id = await started_with_a_card(slack_bot, fake_slack, model, database_url=sqlite_url)
    holder = LockHolder(str(tmp_path / "chatops.db"))
    await holder.hold()
    try:
        assert (await bot.send(click(card)))[0] == 200
        (told,) = await fake_slack.wait_for("chat.postEphemeral")
        assert told.params["text"] == texts.CLICK_NOT_RECORDED and told.params["user"] == ALICE
    finally:
        await holder.release()
    assert ledger.effects == []
    assert (await bot.send(click(card)))[0] == 200
    await bot.settle()
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
