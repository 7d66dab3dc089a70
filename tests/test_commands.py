"""In-chat commands (help / pending / cancel) on Slack and Feishu, the `/chatops` slash command, the
Feishu bot menu, and per-channel tool sets (absent from the model request, refused if called)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse

import sqlalchemy as sa

from storage.models import Approval, AuditEvent, Run
from tests.fakes.openai_server import calls, text, tool_results
from tests.fakes.slack_api import TEAM_ID
from tests.feishu_helpers import ALICE as OU_ALICE
from tests.feishu_helpers import approval_id_of, at_bot, click, envelope, fake_feishu, feishu_bot
from tests.slack_helpers import ALICE, CHANNEL, card_message, fake_slack_fixture, mention, next_ts, signed, slack_bot_fixture
from tests.slack_helpers import click as slack_click
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "fake_slack_fixture", "feishu_bot", "slack_bot_fixture"]  # fixtures used by this module
NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
SALES_POLICY = f"""
[[channels]]
match = "slack:{CHANNEL}"
tools = ["count_*"]
model = "sales-model"
system_prompt = "You help the sales team."
"""


async def statuses(app, table, column="status") -> list[str]:
    async with app.ctx.db.transaction() as session:
        return list((await session.execute(sa.text(f"SELECT {column} FROM {table}"))).scalars().all())


async def audit_kinds(app) -> list[str]:
    async with app.ctx.db.transaction() as session:
        return list((await session.execute(sa.select(AuditEvent.kind).order_by(AuditEvent.seq))).scalars().all())


async def test_slack_help_lists_the_channel_tools_without_asking_the_model(slack_bot, fake_slack, model, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(SALES_POLICY, encoding="utf-8")
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())], env={"CHATOPS_POLICY": str(policy)})
    await bot.send(mention("help"))
    await bot.settle()
    (answer,) = fake_slack.calls_to("chat.postEphemeral")
    assert answer.params["user"] == ALICE
    lines = answer.params["text"].splitlines()
    assert lines[1] == "• count_notes — Count the notes stored under a topic. (runs at once)"
    assert "write_note" not in answer.params["text"]
    assert model.requests == []

    await bot.send(mention("帮助", channel="C0OTHER"))  # another channel: every tool, in Chinese
    await bot.settle()
    text_zh = fake_slack.calls_to("chat.postEphemeral")[-1].params["text"]
    assert "write_note — Write a note.（需你确认）" in text_zh and text_zh.startswith("我在这里能做的事")
    assert model.requests == []


async def test_slack_pending_reposts_working_cards_and_cancel_stops_the_run(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."), calls(NOTE), text("never"))
    fake_slack.add_user(ALICE, "Alice")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("write a note"))
    await bot.settle()
    original = card_message(fake_slack)

    await bot.send(mention("pending"))
    await bot.settle()
    listing, _card = fake_slack.calls_to("chat.postEphemeral")
    assert listing.params["text"].startswith("Waiting for a decision (1):")
    assert "you are the requester" in listing.params["text"]
    copy = fake_slack.ephemerals[max(fake_slack.ephemerals)]
    click_on_copy = slack_click({"ts": copy["ts"], "channel": CHANNEL, "blocks": copy["blocks"]})
    click_on_copy["container"]["is_ephemeral"] = True  # as Slack sends a click on an ephemeral message
    click_on_copy["response_url"] = copy["response_url"]
    assert (await bot.send(click_on_copy))[0] == 200  # the re-posted card's button: same decision path
    await bot.settle()
    assert len(ledger.effects) == 1
    assert "Done: note 1 stored" in json.dumps(fake_slack.messages[original["ts"]]["blocks"])
    # The private copy, which chat.update cannot reach, no longer offers the buttons: it shows the outcome too.
    await fake_slack.wait_until(lambda: "Done: note 1 stored" in json.dumps(copy["blocks"]))
    assert '"Approve"' not in json.dumps(copy["blocks"]) and copy["replaced"] >= 1

    root = next_ts()
    await bot.send(mention("write another note", ts=root))
    await bot.settle()
    second = card_message(fake_slack)
    await bot.send(mention("cancel", thread_ts=root))
    await bot.settle()
    assert fake_slack.calls_to("chat.postMessage")[-1].params["text"].startswith("Stopped. 1 pending approval(s) cancelled")
    async with bot.app.ctx.db.transaction() as session:
        approval = (await session.execute(sa.select(Approval).order_by(Approval.created_at.desc()))).scalars().first()
        runs = (await session.execute(sa.select(Run.status).order_by(Run.created_at))).scalars().all()
    assert (approval.status, approval.decision_reason) == ("cancelled", "cancelled by Alice")
    assert list(runs) == ["done", "cancelled"]
    kinds = await audit_kinds(bot.app)
    assert kinds.count("approval_cancelled") == 1 and kinds.count("run_cancelled") == 1
    assert "Cancelled: cancelled by Alice" in json.dumps(fake_slack.messages[second["ts"]]["blocks"])
    assert len(model.requests) == 3 and len(ledger.effects) == 1  # the model was not asked again

    await bot.send(mention("cancel", thread_ts=root))
    await bot.settle()
    assert fake_slack.calls_to("chat.postMessage")[-1].params["text"] == "There is nothing to cancel in this conversation."


async def test_the_pending_list_quotes_requests_without_their_links_or_broadcasts_taking_effect(slack_bot, fake_slack, model):
    """The list quotes each request's summary, which holds what the model chose: it was sent as mrkdwn,
    so `<https://evil.example|the runbook>` showed as a link to somewhere else."""
    hostile = {"topic": "<https://evil.example|the runbook> <!channel>", "text": "x"}
    model.script(calls(("write_note", hostile)), text("Stored."))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("write a note"))
    await bot.settle()
    await bot.send(mention("pending"))
    await bot.settle()
    listing = fake_slack.calls_to("chat.postEphemeral")[0].params["text"]
    assert "evil.example" in listing and "<https://" not in listing and "<!channel>" not in listing, listing


async def test_slack_slash_command_is_acknowledged_and_answered_privately(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("write a note"))
    await bot.settle()
    form = {
        "command": "/chatops",
        "text": "pending",
        "user_id": ALICE,
        "user_name": "alice",
        "team_id": TEAM_ID,
        "channel_id": CHANNEL,
        "response_url": "http://127.0.0.1:9/unused",
        "trigger_id": "trigger-slash",
        "token": "legacy",
    }
    body = urllib.parse.urlencode(form)
    headers = {"Content-Type": "application/x-www-form-urlencoded", **signed(body)}
    async with bot.http.post(bot.events_url, data=body.encode(), headers=headers) as response:
        assert response.status == 200
    await bot.settle()
    listing, card = fake_slack.calls_to("chat.postEphemeral")
    assert listing.params["user"] == ALICE and listing.params["text"].startswith("Waiting for a decision (1):")
    assert "chatops_approve" in json.dumps(card.params["blocks"])

    form["text"] = "frobnicate"
    body = urllib.parse.urlencode(form)
    async with bot.http.post(bot.events_url, data=body.encode(), headers={**headers, **signed(body)}) as response:
        assert response.status == 200
    await bot.settle()
    assert fake_slack.calls_to("chat.postEphemeral")[-1].params["text"].startswith("Unknown command “frobnicate”")


async def test_per_channel_tool_set_model_and_prompt_are_enforced(slack_bot, fake_slack, model, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(SALES_POLICY, encoding="utf-8")
    ledger = Ledger()
    model.script(calls(NOTE), text("I cannot write notes here."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)], env={"CHATOPS_POLICY": str(policy)})
    await bot.send(mention("write a note"))
    await bot.settle()
    first = model.requests[0]
    assert [t["function"]["name"] for t in first["tools"]] == ["count_notes"]
    assert first["model"] == "sales-model"
    assert first["messages"][0] == {"role": "system", "content": "You help the sales team."}
    (refusal,) = tool_results(model.requests[1])
    assert json.loads(refusal)["error"] == "tool_not_available"
    assert ledger.effects == [] and not [m for m in fake_slack.messages.values() if m.get("blocks")]
    assert "tool_call_invalid" in await audit_kinds(bot.app)


async def test_feishu_commands_in_chinese_and_the_bot_menu(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(NOTE))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("写个笔记", message_id="om_ask"))
    await bot.settle()
    card = bot.card()
    approval_id = approval_id_of(card)

    await bot.send(at_bot("帮助", message_id="om_help"))
    await bot.settle()
    assert bot.fake.texts()[-1].startswith("我在这里能做的事（写操作需要审批）：\n• count_notes")

    await bot.send(at_bot("待审批", message_id="om_pending"))
    await bot.settle()
    assert bot.fake.texts()[-1].startswith("等待审批（1）：")
    reposted = bot.card()  # in a group, help and pending answer the person directly
    assert reposted.message_id != card.message_id and reposted.chat_id == OU_ALICE
    assert "批准" in reposted.content
    assert model.requests and len(model.requests) == 1  # commands never reach the model

    menu = envelope(
        "application.bot.menu_v6",
        {
            "operator": {"operator_name": "Alice", "operator_id": {"open_id": OU_ALICE, "union_id": "on_a", "user_id": ""}},
            "event_key": "cancel",
            "timestamp": 1700000000,
        },
    )
    status, _ = await bot.send(menu)
    assert status == 200
    await bot.settle()
    sent = [m for m in bot.fake.sent() if m.msg_type == "text"][-1]
    assert sent.chat_id == OU_ALICE and sent.json["text"].startswith("已停止。已取消 1 个待审批操作")
    assert await statuses(bot.app, "approval") == ["cancelled"]
    assert "已取消：Alice 已取消" in bot.fake.messages[card.message_id].content
    status, answer = await bot.send(click(approval_id, "approve", card_message_id=card.message_id))
    assert answer["toast"]["type"] == "warning" and ledger.effects == []


async def test_what_only_reads_does_not_wait_for_the_sqlite_write_lock(bots, model, sqlite_url):
    """A person's home (pending approvals, recent runs) and the cancel menu's look-up only read:
    another process holding SQLite's write lock does not hold them up."""
    from bot.core import commands, home
    from storage.engine import BACKGROUND_LOCK_WAIT
    from tests.fault_helpers import PLATFORM, FaultChannel, LockHolder, message, settle

    model.script(calls(("write_note", {"topic": "ops", "text": "restart web-1"})))
    app = await bots.start(toolsets=[notes_toolset(Ledger())])
    app.ctx.channels[PLATFORM] = FaultChannel()
    await bots.run(app)
    msg = message("write a note")
    assert await app.core.accept_message(msg)
    await settle(app)
    holder = LockHolder(sqlite_url.removeprefix("sqlite:///"))
    await holder.hold()
    try:
        async with asyncio.timeout(BACKGROUND_LOCK_WAIT / 2):  # a write would wait for the lock this long
            view = await home.home_for(app.core, msg.user)
            conversation = await commands.latest_conversation(app.core, msg.user)
    finally:
        holder.kill()
    assert [role for _, role in view.pending] == ["requester"] and len(view.recent) == 1
    assert conversation == msg.conversation_key


def test_the_slash_form_the_help_names_is_the_same_command_when_typed_as_a_message():
    """The help says "(also /chatops help | pending | cancel)"; typed in the terminal (or a thread, where
    Slack has no slash commands), `/chatops pending` went to the model as a new message and cancelled
    the cards it was meant to list."""
    from bot.core import commands

    for typed, command in [("/chatops pending", "pending"), ("/ChatOps  help", "help"), ("/chatops cancel。", "cancel")]:
        assert commands.parse(typed) == commands.parse(command) is not None, typed
    assert commands.parse("/chatops create a lead") is None and commands.parse("chatops pending now") is None
