"""The approval flow through Feishu webhooks: real `/feishu/events`, real lark-oapi client, fake Feishu.

Every request is encrypted and signed the way Feishu does it (`tests.feishu_helpers.wire`).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.core import texts
from bot.core.errors import ConfigError
from bot.feishu import FeishuAdapter
from storage.models import Approval, utcnow
from tests.fakes.feishu_api import BOT_OPEN_ID
from tests.fakes.openai_server import calls, text
from tests.feishu_helpers import (
    ALICE,
    BOB,
    DM,
    GROUP,
    approval_id_of,
    at_bot,
    card_text,
    click,
    dm,
    fake_feishu,
    feishu_bot,
    feishu_env,
    message,
)
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]  # fixtures used by this module

WAITING = (
    "Asked for approval of 1 action(s): see the card(s) below."  # the run's progress line above its card; the answer comes below
)
LEAD = {"name": "Zhang San", "email": "zhangsan@example.com", "need": "a product demo", "company": "Acme"}


async def test_seed_scenario_group_mention_to_final_reply_in_the_thread(feishu_bot, model, db_url):
    model.script(calls(("create_crm_lead", LEAD)), text("Created the lead for Zhang San."))
    bot = await feishu_bot(database_url=db_url)
    status, body = await bot.send(
        at_bot("create a lead for Zhang San, zhangsan@example.com, Acme, wants a demo", message_id="om_ask")
    )
    assert (status, body) == (200, {})
    await bot.settle()
    assert model.requests[0]["messages"][-1]["content"] == "create a lead for Zhang San, zhangsan@example.com, Acme, wants a demo"
    assert bot.fake.reactions == [("om_ask", "OnIt")]  # the user saw at once that the bot is on it
    card = bot.card()
    assert card.reply_to == "om_ask" and card.in_thread and card.chat_id == GROUP
    shown = card_text(card)
    for expected in ["create_crm_lead", "Zhang San", "zhangsan@example.com", "a product demo", "<at id=ou_alice></at>"]:
        assert expected in shown
    approval_id = approval_id_of(card)

    status, answer = await bot.send(click(approval_id, "approve", card_message_id=card.message_id))
    assert status == 200
    assert answer["toast"] == {"type": "success", "content": texts.DECIDED_APPROVED.format(tool="create_crm_lead")}
    assert answer["card"]["type"] == "raw"
    assert not any(e["tag"] == "form" for e in answer["card"]["data"]["body"]["elements"])
    await bot.settle()

    assert await bot.count("crm_lead", "email = 'zhangsan@example.com'") == 1
    final = bot.fake.cards()[-1].json
    assert final["header"]["template"] == "green"
    assert any(texts.CARD_SUCCEEDED.split(":")[0] in e.get("text", {}).get("content", "") for e in final["body"]["elements"])
    assert bot.fake.messages[card.message_id].patches  # the outcome was patched into the card
    replies = [m for m in bot.fake.sent() if m.msg_type == "text"]
    assert [m.json["text"] for m in replies] == [WAITING, "Created the lead for Zhang San."]  # the answer below the card
    assert all(r.reply_to == "om_ask" and r.in_thread for r in replies)


async def test_seed_scenario_in_a_dm(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "lead", "text": "call Zhang San"})), text("Noted."))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    assert (await bot.send(dm("note: call Zhang San", message_id="om_dm1")))[0] == 200
    await bot.settle()
    card = bot.card()
    assert card.reply_to == "om_dm1" and not card.in_thread
    approval_id = approval_id_of(card)
    await bot.send(click(approval_id))
    await bot.settle()
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
    assert bot.fake.texts() == [WAITING, "Noted."]
    assert not next(m for m in bot.fake.sent() if m.msg_type == "text").in_thread


async def test_follow_up_in_the_thread_continues_the_conversation(feishu_bot, model):
    model.script(text("Hello!"), text("Still here."))
    bot = await feishu_bot()
    await bot.send(at_bot("hi", message_id="om_root"))
    await bot.settle()
    await bot.send(at_bot("are you there?", message_id="om_next", root_id="om_root"))
    await bot.settle()
    assert [m["content"] for m in model.requests[-1]["messages"] if m["role"] != "system"] == ["hi", "Hello!", "are you there?"]


async def test_group_message_mentioning_someone_else_starts_no_run(feishu_bot, model):
    bot = await feishu_bot()
    status, _ = await bot.send(message("@_user_1 can you check this?", mentions=[(BOB, "Bob")]))
    await bot.send(message("@_all standup in 5"))
    await bot.settle()
    assert status == 200
    assert model.requests == [] and bot.fake.sent() == [] and bot.fake.reactions == []
    assert await bot.count("inbox_event") == 0


async def test_reject_with_a_reason_from_the_card_form(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("Understood, I did not write it."))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write a note"))
    await bot.settle()
    approval_id = approval_id_of(bot.card())
    status, answer = await bot.send(click(approval_id, "reject", reason="not this topic"))
    assert status == 200 and answer["toast"] == {"type": "info", "content": texts.DECIDED_REJECTED}
    await bot.settle()
    assert ledger.effects == []
    assert "Rejected by ou_alice: not this topic" in card_text(bot.fake.cards()[-1])
    assert any("not this topic" in str(m.get("content")) for m in model.requests[-1]["messages"] if m["role"] == "tool")
    assert bot.fake.texts() == [WAITING, "Understood, I did not write it."]


async def test_unauthorized_click_gets_a_toast_and_changes_nothing(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write a note"))
    await bot.settle()
    card = bot.card()
    approval_id = approval_id_of(card)
    status, answer = await bot.send(click(approval_id, operator=BOB))
    await bot.settle()
    assert status == 200 and answer["toast"]["type"] == "error" and "card" not in answer
    assert texts.NOT_ALLOWED.split(":")[0] in answer["toast"]["content"]
    assert ledger.effects == [] and bot.fake.messages[card.message_id].patches == []
    async with bot.app.ctx.db.transaction() as session:
        assert (await session.get(Approval, approval_id)).status == "pending"
    assert await bot.count("audit_event", "kind = 'click_refused' AND status = 'not_allowed'") == 1


async def test_double_click_runs_the_tool_once(feishu_bot, model, db_url):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)], database_url=db_url)
    await bot.send(at_bot("write a note"))
    await bot.settle()
    approval_id = approval_id_of(bot.card())
    answers = await asyncio.gather(*(bot.send(click(approval_id)) for _ in range(2)))
    answers += [await bot.send(click(approval_id))]
    await bot.settle()
    assert len(ledger.effects) == 1
    kinds = sorted(a["toast"]["type"] for _, a in answers)
    assert kinds == ["success", "warning", "warning"]
    assert texts.ALREADY_DECIDED.format(status="approved", who="ou_alice") in [a["toast"]["content"] for _, a in answers]


async def test_click_after_expiry_says_so_and_runs_nothing(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("It expired."))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write a note"))
    await bot.settle()
    approval_id = approval_id_of(bot.card())
    async with bot.app.ctx.db.transaction() as session:
        await session.execute(
            sa.update(Approval).where(Approval.id == approval_id).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    status, answer = await bot.send(click(approval_id))
    await bot.settle()
    assert status == 200 and answer["toast"]["type"] == "warning"
    assert answer["toast"]["content"].startswith(texts.EXPIRED.split("{")[0])
    assert answer["card"]["data"]["header"]["template"] == "grey"
    assert ledger.effects == []
    again = (await bot.send(click(approval_id)))[1]
    assert again["toast"]["content"].startswith(texts.EXPIRED.split("{")[0])


async def test_bot_identity_comes_from_bot_info_at_start(feishu_bot):
    bot = await feishu_bot()
    assert bot.adapter.bot_open_id == BOT_OPEN_ID
    assert len(bot.fake.calls_to("bot_info")) == 1


async def test_reply_text_cannot_mention_everyone(feishu_bot, model):
    model.script(text('Sure <at user_id="all"></at> done'))
    bot = await feishu_bot()
    await bot.send(dm("say hi to all"))
    await bot.settle()
    assert bot.fake.texts() == ['Sure <\u200bat user_id="all"></at> done']


async def test_reply_to_a_withdrawn_message_is_posted_in_the_chat(feishu_bot, model):
    model.script(text("answer"))
    bot = await feishu_bot()
    bot.fake.recall("om_gone")
    await bot.send(dm("question", message_id="om_gone"))
    await bot.settle()
    [posted] = [m for m in bot.fake.sent() if m.msg_type == "text"]
    assert posted.json["text"] == "answer" and posted.reply_to is None and posted.chat_id == DM


async def test_a_token_invalid_answer_mid_flow_is_recovered(feishu_bot, model):
    model.script(text("pong"))
    bot = await feishu_bot()
    bot.fake.fail_token_once()
    await bot.send(dm("ping", sender=ALICE))
    await bot.settle()
    assert bot.fake.texts() == ["pong"]
    assert len(bot.fake.calls_to("token")) == 2


async def test_group_messages_wait_for_the_bots_identity_dms_do_not(feishu_bot, fake_feishu, model):
    model.script(text("dm answer"), text("group answer"))
    fake_feishu.bot_open_id = ""  # bot info answers without an open_id (Feishu trouble at boot)
    bot = await feishu_bot()
    assert bot.adapter.bot_open_id is None
    assert (await bot.send(dm("hello")))[0] == 200
    mention = at_bot("hello group", message_id="om_g1", event_id="evt-g1")
    assert (await bot.send(mention))[0] == 503  # Feishu redelivers later
    await bot.adapter._bot_id_task
    fake_feishu.bot_open_id = BOT_OPEN_ID
    bot.adapter._bot_id_next = 0.0
    assert (await bot.send(mention))[0] == 503
    await bot.adapter._bot_id_task
    assert bot.adapter.bot_open_id == BOT_OPEN_ID
    assert (await bot.send(mention))[0] == 200  # the redelivery is handled once the identity is known
    await bot.settle()
    assert sorted(bot.fake.texts()) == ["dm answer", "group answer"]


async def test_a_rejected_app_secret_stops_start_up_with_the_variable_named(bots, fake_feishu):
    fake_feishu.app_secret = "the-real-secret"
    app = await bots.start(serve_http=True, **feishu_env(fake_feishu))
    app.add_adapter(FeishuAdapter(app.core, app.settings))
    with pytest.raises(ConfigError, match=r"FEISHU_APP_SECRET was rejected by Feishu \(code 10014\)"):
        await bots.run(app)
    assert len(fake_feishu.calls_to("token")) == 1  # not retried


async def test_with_workers_the_card_is_refreshed_after_the_click_answer(feishu_bot, model):
    """`serve --workers N`: the front answers a click with the card as it was; a worker's card update may
    land before that answer and be covered by it. The front queues one more refresh, due a moment after
    its answer, which a later update does not swallow: the card ends on the real state, patched after the
    click was answered."""
    from bot.app import Role, build_app
    from tests.feishu_helpers import FeishuBot

    model.script(calls(("create_crm_lead", LEAD)), text("Created."))
    worker = await feishu_bot()  # delivers cards and runs the work, as a worker process would
    await worker.send(at_bot("create a lead for Zhang San", message_id="om_ask"))
    await worker.settle()
    card = worker.card()
    approval_id = approval_id_of(card)

    front_app = await build_app(worker.app.settings, role=Role.FRONT, wake=lambda: None)
    front_adapter = FeishuAdapter(front_app.core, front_app.settings)
    front_app.add_adapter(front_adapter)
    await front_app.start(serve_http=True)
    front = FeishuBot(front_app, front_adapter, worker.fake, worker.http, worker.key)
    try:
        status, answer = await front.send(click(approval_id, "approve", card_message_id=card.message_id))
        assert status == 200 and answer["card"]["type"] == "raw"  # the card as it was at the click
        answered_at = utcnow()
        patches_at_answer = len(worker.fake.messages[card.message_id].patches)
        await worker.app.sweeper.pick_up()  # the worker's wake-up: the approved call, then the card updates
        await worker.settle()
        async with asyncio.timeout(30):
            while await worker.count("outbox_job", "status = 'pending'"):
                await worker.app.core.out.deliver_due()  # the refresh is due a moment after the answer
                await worker.settle()
    finally:
        await front_app.stop()
    assert utcnow() - answered_at >= timedelta(seconds=0.9)  # the last rendering came after the answer
    patches = worker.fake.messages[card.message_id].patches
    assert len(patches) > patches_at_answer
    final = worker.fake.cards()[-1].json
    assert final["header"]["template"] == "green"  # succeeded, not the state at the click


async def test_a_click_the_database_cannot_record_gets_a_toast_to_click_again(feishu_bot, model, sqlite_url, tmp_path):
    """A card click is not sent again: one that met a locked database (another process holding SQLite's
    write lock) gets an error toast asking to click again, changes nothing, and the next click runs once."""
    from tests.fault_helpers import LockHolder

    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)], database_url=sqlite_url)
    await bot.send(at_bot("write a note"))
    await bot.settle()
    approval_id = approval_id_of(bot.card())
    holder = LockHolder(str(tmp_path / "chatops.db"))
    await holder.hold()
    try:
        status, answer = await bot.send(click(approval_id))
    finally:
        await holder.release()
    assert (status, answer) == (200, {"toast": {"type": "error", "content": texts.CLICK_NOT_RECORDED}})
    assert ledger.effects == []
    status, answer = await bot.send(click(approval_id))
    await bot.settle()
    assert answer["toast"]["type"] == "success" and len(ledger.effects) == 1
