"""Visible progress on Feishu: one progress line per run (a text message the bot edits in place with
`PUT /im/v1/messages/:id`), replaced by the answer; an answer whose edit is refused is replied instead."""

from __future__ import annotations

from bot.core.events import Thread
from tests.fakes.openai_server import calls, text
from tests.feishu_helpers import approval_id_of, at_bot, click, fake_feishu, feishu_bot
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]  # fixtures used by this module

COUNT = ("count_notes", {"topic": "ops"})
NOTE = ("write_note", {"topic": "ops", "text": "重启 web-1"})


async def test_the_progress_line_is_edited_in_place_and_the_answer_comes_below_the_card(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(COUNT), calls(NOTE), text("已记录。"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("统计并记一条笔记", message_id="om_ask"))
    await bot.settle()
    (progress,) = [m for m in bot.fake.sent() if m.msg_type == "text"]
    assert progress.reply_to == "om_ask" and progress.in_thread
    assert progress.json["text"] == "已请求审批 1 项操作，见下方卡片。"  # in Chinese, the Feishu default
    assert len(bot.fake.calls_to("edit")) == 1  # "正在运行 count_notes…" -> waiting

    card = bot.card()
    await bot.send(click(approval_id_of(card), "approve", card_message_id=card.message_id))
    await bot.settle()
    assert len(ledger.effects) == 1
    waiting, answer = [m for m in bot.fake.sent() if m.msg_type == "text"]  # the answer below the card
    assert waiting.message_id == progress.message_id and waiting.json["text"] == "已请求审批 1 项操作，见下方卡片。"
    assert answer.json["text"] == "已记录。" and answer.reply_to == "om_ask" and answer.in_thread


async def test_an_answer_whose_edit_is_refused_is_replied(feishu_bot, model):
    model.script(calls(COUNT), text("共 0 条。"))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(at_bot("统计笔记", message_id="om_ask2"))
    await bot.settle()
    (asked,) = [m for m in bot.fake.sent() if m.msg_type == "text"]
    assert asked.json["text"] == "共 0 条。"  # the progress line became the answer

    thread = Thread("feishu", {"chat_id": asked.chat_id, "message_id": "om_ask2", "in_thread": True})
    await bot.adapter.post_answer(thread, "后来的回答", "om_gone")  # a progress line that can no longer be edited
    later = [m for m in bot.fake.sent() if m.msg_type == "text"][-1]
    assert later.json["text"] == "后来的回答" and later.reply_to == "om_ask2"


LONG = "\n".join(f"第 {i} 行：服务 web-{i} 已重启，健康检查正常。<at id=all></at>" for i in range(80))


async def test_a_long_answer_streams_as_a_cardkit_card_and_the_progress_line_is_withdrawn(feishu_bot, model):
    model.script(calls(COUNT), text(LONG))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(at_bot("汇报", message_id="om_long"))
    await bot.settle()

    (card_id,) = bot.fake.card_entities
    entity = bot.fake.card_entities[card_id]
    assert entity["card"]["config"]["streaming_mode"] is True and entity["streaming"] is False  # streamed, then closed
    assert entity["text"].replace("\u200b", "") == LONG and "<at" not in entity["text"]  # complete; no @all can ring
    assert len(bot.fake.calls_to("card_stream")) >= 2
    (message,) = bot.fake.sent()  # the progress line was withdrawn; the streaming card stays
    assert message.json == {"type": "card", "data": {"card_id": card_id}} and message.reply_to == "om_long"
    assert len(bot.fake.calls_to("recall")) == 1


async def test_when_cardkit_refuses_the_long_answer_replaces_the_progress_line(feishu_bot, model):
    model.script(calls(COUNT), text(LONG))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    bot.fake.fail_next["card_create"] = 1
    await bot.send(at_bot("汇报", message_id="om_long2"))
    await bot.settle()
    (message,) = bot.fake.sent()
    assert message.msg_type == "text" and message.json["text"] == LONG.replace("<at", "<\u200bat")
    assert bot.fake.calls_to("recall") == []


async def test_a_stream_that_breaks_is_withdrawn_and_the_answer_posted_once(feishu_bot, model):
    model.script(calls(COUNT), text(LONG))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    bot.fake.fail_next["card_stream"] = 10
    await bot.send(at_bot("汇报", message_id="om_long3"))
    await bot.settle()
    (message,) = bot.fake.sent()  # the half-streamed card was withdrawn; the answer replaced the progress line
    assert message.msg_type == "text" and message.json["text"].startswith("第 0 行")
