"""Rate-limit storms from the platforms: more 429s in a row than the SDK's own retries absorb.
The outbox keeps the card, its update and the reply as durable jobs and delivers them once the
platform lets it (waiting on the fakes' events, never on sleeps)."""

from __future__ import annotations

from typing import Any

from bot.slack.events import APPROVE_ACTION
from tests.fakes.openai_server import Reply, calls, last_user_text, text
from tests.fault_helpers import Stages, settle, summary
from tests.feishu_helpers import at_bot, fake_feishu, feishu_bot
from tests.slack_helpers import approval_id_of, card_message, click, fake_slack_fixture, mention, slack_bot_fixture

__all__ = ["fake_feishu", "fake_slack_fixture", "feishu_bot", "slack_bot_fixture"]
STORM = 5  # slack_sdk retries a 429 three times by itself; the fourth and fifth reach the outbox


def store_then_answer(body: dict[str, Any]) -> Reply:
    if body["messages"][-1]["role"] == "tool":
        return text("Stored.")
    if "note" in last_user_text(body):
        return calls(("store_note", {"topic": "x"}))
    return text("Hello from the bot.")


async def test_slack_429_storms_on_post_message_and_update_still_deliver_card_update_and_reply(slack_bot, fake_slack, model):
    model.responder = store_then_answer
    stages = Stages()
    bot = await slack_bot(toolsets=[stages.toolset()])
    fake_slack.rate_limit("chat.postMessage", times=STORM, retry_after=1)
    assert (await bot.send(mention("store a note")))[0] == 200
    # the progress line and the card, after the storm
    await fake_slack.wait_until(lambda: any(m.get("blocks") for m in fake_slack.messages.values()), timeout=90)
    card = card_message(fake_slack)
    approval_id = approval_id_of(card)
    assert len(fake_slack.calls_to("chat.postMessage", ok_only=False)) > STORM

    fake_slack.rate_limit("chat.update", times=STORM, retry_after=1)
    fake_slack.rate_limit("chat.postMessage", times=STORM, retry_after=1)
    assert (await bot.send(click(card)))[0] == 200
    # the answer replaces the progress line (chat.update), after the storms
    await fake_slack.wait_until(lambda: "Stored." in [r["text"] for r in bot.replies()], timeout=90)
    while "Done:" not in str(fake_slack.messages[card["ts"]].get("blocks")):  # the last card update, after its retries
        await fake_slack.wait_for("chat.update", count=len(fake_slack.calls_to("chat.update")) + 1, timeout=90)
    await bot.settle()
    await settle(bot.app)
    assert "Stored." in [r["text"] for r in bot.replies()]
    assert APPROVE_ACTION not in str(fake_slack.messages[card["ts"]].get("blocks"))  # buttons gone: the outcome shows
    assert stages.runs == [approval_id]
    state = await summary(bot.app)
    assert state.approvals == {approval_id: "succeeded"} and state.outbox["gave_up"] == 0 and state.stuck == []


async def test_feishu_rate_limits_still_deliver_the_reply_and_the_card(feishu_bot, fake_feishu, model):
    model.responder = store_then_answer
    bot = await feishu_bot(toolsets=[Stages().toolset()])
    attempts = bot.adapter.api.attempts  # the client's own retries; the storm outlasts them twice
    fake_feishu.rate_limit(times=attempts * 2 + 1, reset=1)
    assert (await bot.send(at_bot("say hello")))[0] == 200
    await fake_feishu.wait_for(lambda: "Hello from the bot." in fake_feishu.texts(), timeout=90)

    fake_feishu.rate_limit(times=attempts * 2 + 1, reset=1)
    assert (await bot.send(at_bot("store a note")))[0] == 200
    await fake_feishu.wait_for(lambda: bool(fake_feishu.cards()), timeout=90)
    await bot.settle()
    await settle(bot.app)
    limited = [c for c in fake_feishu.calls if c.path.startswith("/open-apis/im")]
    assert len(limited) > 2 * (attempts * 2 + 1)  # every 429 was answered to a real call
    state = await summary(bot.app)
    assert list(state.approvals.values()) == ["pending"] and state.outbox["gave_up"] == 0 and state.stuck == []
