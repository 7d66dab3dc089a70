"""An exception at each stage of a run, raised by a real test tool or test channel (nothing patched):
the user is told in one sentence, the run ends (or waits on a visible card), and the conversation
takes the next message."""

from __future__ import annotations

import re

from bot.app import App
from bot.core import texts
from bot.core.events import DecisionRequest
from tests.fakes.openai_server import calls, text
from tests.fault_helpers import ALICE, FaultChannel, Stages, message, pending_ids, settle, summary

INTERNAL = re.escape(texts.INTERNAL_ERROR.split("(ref")[0]) + r"\(ref [0-9a-f]{8}\)"


async def boom() -> None:
    raise RuntimeError("injected failure /etc/secret-path line 42")


async def start(bots, stages: Stages, **env: str) -> tuple[App, FaultChannel]:
    app = await bots.start(toolsets=[stages.toolset()], **env)
    channel = FaultChannel()
    app.ctx.channels[channel.platform] = channel
    await bots.run(app)
    return app, channel


def one_clean_sentence(reply: str) -> None:
    assert "Traceback" not in reply and "RuntimeError" not in reply and "secret-path" not in reply
    assert "\n" not in reply.strip()


async def next_message_is_answered(app: App, channel: FaultChannel, model, conversation: str) -> None:
    model.script(text("Still here."))
    await app.core.accept_message(message("are you there?", conversation=conversation))
    await channel.wait_for(lambda: "Still here." in channel.replies)
    await settle(app)
    assert (await summary(app)).stuck == []


async def test_a_check_that_raises_ends_the_run_with_one_sentence(bots, model):
    stages = Stages(check=boom)
    app, channel = await start(bots, stages)
    model.script(calls(("store_note", {"topic": "x"})))
    msg = message("store a note")
    await app.core.accept_message(msg)
    await channel.wait_for(lambda: bool(channel.replies))
    await settle(app)
    assert re.fullmatch(INTERNAL, channel.replies[-1]), channel.replies
    one_clean_sentence(channel.replies[-1])
    state = await summary(app)
    assert state.runs["failed"] == 1 and state.stuck == [] and channel.cards == []
    await next_message_is_answered(app, channel, model, msg.conversation_key)


async def test_a_preview_that_raises_still_shows_a_card_saying_so(bots, model):
    stages = Stages(preview=boom)
    app, channel = await start(bots, stages)
    model.script(calls(("store_note", {"topic": "x"})), text("Not stored, as you wished."))
    msg = message("store a note")
    await app.core.accept_message(msg)
    await channel.wait_for(lambda: bool(channel.cards))
    assert any("preview unavailable" in line for line in channel.cards[0].preview)
    (approval_id,) = await pending_ids(app)
    await app.core.decide(DecisionRequest(approval_id, ALICE, approve=False, reason="no"))
    await channel.wait_for(lambda: "Not stored, as you wished." in channel.replies)
    await settle(app)
    assert stages.runs == [] and (await summary(app)).stuck == []
    await next_message_is_answered(app, channel, model, msg.conversation_key)


async def test_a_read_tool_that_raises_is_reported_to_the_model_and_the_run_finishes(bots, model):
    stages = Stages(read=boom)
    app, channel = await start(bots, stages)
    model.script(calls(("look_up", {"topic": "x"})), text("The lookup failed, sorry."))
    msg = message("look x up")
    await app.core.accept_message(msg)
    await channel.wait_for(lambda: bool(channel.replies))
    await settle(app)
    assert channel.replies == ["The lookup failed, sorry."]
    told = model.requests[-1]["messages"][-1]
    assert told["role"] == "tool" and "RuntimeError" in told["content"] and "secret-path" not in told["content"]
    assert (await summary(app)).runs["done"] == 1
    await next_message_is_answered(app, channel, model, msg.conversation_key)


async def test_a_card_that_can_never_be_posted_is_cancelled_at_the_deadline_and_the_user_told(bots, model):
    stages = Stages()
    app, channel = await start(bots, stages, CHATOPS_OUTBOX_DEADLINE="2")
    channel.before_card = boom
    model.script(calls(("store_note", {"topic": "x"})), text("I could not ask for approval, so nothing was stored."))
    msg = message("store a note")
    await app.core.accept_message(msg)
    notice = texts.CARD_UNDELIVERED_NOTICE.format(tool="store_note")
    await channel.wait_for(lambda: notice in channel.replies and len(channel.replies) >= 2)
    await settle(app)
    assert channel.card_attempts >= 2  # retried until the deadline, then given up
    assert channel.replies[-1] == "I could not ask for approval, so nothing was stored."
    state = await summary(app)
    assert list(state.approvals.values()) == ["cancelled"] and state.outbox["gave_up"] == 1
    assert stages.runs == [] and state.stuck == []
    channel.before_card = stages.check  # the channel works again
    await next_message_is_answered(app, channel, model, msg.conversation_key)


async def test_a_reply_that_fails_twice_is_delivered_on_the_third_attempt(bots, model):
    failures = iter([boom, boom])

    async def twice() -> None:
        await next(failures, Stages().check)()

    app, channel = await start(bots, Stages())
    channel.before_reply = twice
    model.script(text("Here is your answer."))
    msg = message("hello")
    await app.core.accept_message(msg)
    await channel.wait_for(lambda: "Here is your answer." in channel.replies)
    await settle(app)
    assert channel.replies == ["Here is your answer."] and channel.reply_attempts == 3
    state = await summary(app)
    assert state.runs["done"] == 1 and state.outbox["sent"] == 1 and state.stuck == []
    await next_message_is_answered(app, channel, model, msg.conversation_key)
