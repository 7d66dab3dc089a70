"""The long connection: the real `lark.ws.Client` in its thread, against the fake's websocket.

The fake speaks the SDK's protocol (endpoint lookup, then pbbp2 frames), so these tests drive
the SDK's own receive loop, our frame handler and the same `dispatch` the webhook uses, with
real event payloads.
"""

from __future__ import annotations

import asyncio
import importlib

from bot.core.errors import StorageError
from tests.fakes.openai_server import calls, text
from tests.feishu_helpers import approval_id_of, at_bot, click, dm, fake_feishu, feishu_bot
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]


async def ws_bot(feishu_bot, **kwargs):
    bot = await feishu_bot(mode="ws", key=None, token=None, **kwargs)
    assert bot.adapter._long is not None
    async with asyncio.timeout(10):
        await bot.adapter._long.wait_connected()
    return bot


async def test_no_http_route_in_long_connection_mode(feishu_bot):
    bot = await ws_bot(feishu_bot)
    assert bot.adapter.routes() == []
    async with bot.http.post(bot.events_url, data=b"{}") as response:
        assert response.status == 404


async def test_sdk_loop_is_the_threads_own_not_the_main_loop(feishu_bot):
    bot = await ws_bot(feishu_bot)
    ws_module = importlib.import_module("lark_oapi.ws.client")
    assert ws_module.loop is bot.adapter._long._loop
    assert ws_module.loop is not asyncio.get_running_loop()
    assert ws_module.loop.is_running()


async def test_approval_flow_over_the_long_connection(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "ws", "text": "hello"})), text("Stored."))
    bot = await ws_bot(feishu_bot, toolsets=[notes_toolset(ledger)])
    payload = at_bot("write a note", message_id="om_ws1")
    bot.fake.user_message("om_ws1", "oc_group")
    ack = await bot.fake.push(payload)
    assert ack == {"code": 200}
    await bot.settle()
    card = bot.card()
    assert card.reply_to == "om_ws1" and card.in_thread
    approval_id = approval_id_of(card)
    ack = await bot.fake.push(click(approval_id, reason="ignored"))
    assert ack["code"] == 200
    assert ack["data"]["toast"]["type"] == "success" and ack["data"]["card"]["type"] == "raw"
    await bot.settle()
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
    assert bot.fake.texts() == [
        "Asked for approval of 1 action(s): see the card(s) below.",
        "Stored.",
    ]  # the pause line above the card, the answer below it


async def test_card_frames_are_answered_not_dropped(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "ws", "text": "x"})), text("ok"))
    bot = await ws_bot(feishu_bot, toolsets=[notes_toolset(ledger)])
    await bot.fake.push(dm("note please"))
    await bot.settle()
    approval_id = approval_id_of(bot.card())
    ack = await bot.fake.push(click(approval_id), frame_type="card")
    assert ack["code"] == 200 and ack["data"]["toast"]["type"] == "success"
    await bot.settle()
    assert len(ledger.effects) == 1


async def test_redelivered_frames_start_one_run(feishu_bot, model):
    model.script(text("once"), text("twice?"))
    bot = await ws_bot(feishu_bot)
    payload = dm("hello", message_id="om_same", event_id="evt-same")
    acks = [await bot.fake.push(payload) for _ in range(3)]
    other_event_same_message = dm("hello", message_id="om_same", event_id="evt-other")
    acks.append(await bot.fake.push(other_event_same_message))
    await bot.settle()
    assert {a["code"] for a in acks} == {200}
    assert len(model.requests) == 1 and bot.fake.texts() == ["once"]


async def test_fragmented_frames_are_reassembled(feishu_bot, model):
    model.script(text("whole"))
    bot = await ws_bot(feishu_bot)
    assert await bot.fake.push(dm("a message split over three frames " * 20), parts=3) == {"code": 200}
    await bot.settle()
    assert model.requests[0]["messages"][-1]["content"].startswith("a message split over three frames")
    assert bot.fake.texts() == ["whole"]


async def test_storage_failure_is_acked_as_500_so_feishu_redelivers(feishu_bot, model, monkeypatch):
    bot = await ws_bot(feishu_bot)

    async def broken(msg):
        raise StorageError("could not record the message: OperationalError")

    monkeypatch.setattr(bot.app.core, "accept_message", broken)
    ack = await bot.fake.push(dm("hello"))
    assert ack == {"code": 500}
    assert model.requests == []


async def test_unreadable_frames_are_acked_and_ignored(feishu_bot, model):
    bot = await ws_bot(feishu_bot)
    payload = dm("x")
    del payload["event"]["message"]["message_id"]
    assert await bot.fake.push(payload) == {"code": 200}
    assert await bot.fake.push({"schema": "2.0", "header": {"event_type": "im.chat.member.bot.added_v1"}}) == {"code": 200}
    await bot.settle()
    assert model.requests == []


async def test_stop_ends_the_thread_and_allows_a_new_connection(feishu_bot, bots):
    bot = await ws_bot(feishu_bot)
    long = bot.adapter._long
    thread = long._thread
    await bots.stop_all()
    assert not thread.is_alive()
    again = await ws_bot(feishu_bot)
    assert again.adapter._long.connected
