"""Visible progress on Slack: one progress message per run, edited in place with the step in progress,
then replaced by the answer; a slow model edits it instead of posting a notice; a long answer streams
(`chat.startStream` / `appendStream` / `stopStream`) and falls back to a plain answer when Slack refuses."""

from __future__ import annotations

from tests.fakes.openai_server import calls, text
from tests.slack_helpers import (  # noqa: F401 - fixtures
    ALICE,
    CHANNEL,
    card_message,
    click,
    fake_slack_fixture,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

COUNT = ("count_notes", {"topic": "ops"})
NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
LONG = "\n".join(f"Line {i}: the service web-{i} restarted cleanly and answers health checks." for i in range(60))


def progress_texts(fake) -> list[str]:
    """Every text the bot wrote into plain (non-card) messages, posts and edits, in order."""
    texts = []
    for call in fake.calls:
        if call.method in ("chat.postMessage", "chat.update") and not call.params.get("blocks"):
            texts.append(call.params.get("text"))
    return texts


async def test_one_progress_message_is_edited_in_place_and_the_answer_comes_below_the_card(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(COUNT), calls(NOTE), text("Stored the note."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    root = next_ts()
    await bot.send(mention("count, then write a note", ts=root))
    await bot.settle()

    (progress,) = bot.replies()  # one plain message so far: the progress line, above the card
    assert (progress["channel"], progress["thread_ts"]) == (CHANNEL, root)
    assert progress["text"] == "Asked for approval of 1 action(s): see the card(s) below."
    assert progress_texts(fake_slack)[:2] == ["Running count_notes…", "Asked for approval of 1 action(s): see the card(s) below."]
    assert list(fake_slack.messages).index(progress["ts"]) < list(fake_slack.messages).index(card_message(fake_slack)["ts"])

    await bot.send(click(card_message(fake_slack)))
    await bot.settle()
    assert len(ledger.effects) == 1
    waiting, answer = bot.replies()  # the answer is a new message below the card; the line above stays true
    assert waiting["ts"] == progress["ts"] and waiting["text"] == progress["text"]
    order = list(fake_slack.messages)
    assert order.index(answer["ts"]) > order.index(card_message(fake_slack)["ts"])
    assert answer["text"] == "Stored the note." and answer["thread_ts"] == root
    assert progress_texts(fake_slack)[-1] == "Stored the note."


async def test_a_run_without_steps_answers_with_one_plain_post(slack_bot, fake_slack, model):
    model.script(text("hello"))
    bot = await slack_bot()
    await bot.send(mention("hi"))
    await bot.settle()
    assert [m["text"] for m in bot.replies()] == ["hello"]
    assert fake_slack.calls_to("chat.update") == []


async def test_a_run_that_answers_within_a_second_shows_no_progress_line(slack_bot, fake_slack, model):
    model.script(calls(COUNT), text("3 notes."))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())], env={"CHATOPS_PROGRESS_AFTER": "1"})  # the default
    await bot.send(mention("count the notes"))
    await bot.settle()
    assert [m["text"] for m in bot.replies()] == ["3 notes."]  # no "Running count_notes…" first
    assert progress_texts(fake_slack) == ["3 notes."] and fake_slack.calls_to("chat.update") == []


async def test_a_run_still_working_after_a_second_shows_its_step_then_the_answer_replaces_it(slack_bot, fake_slack, model):
    model.script(calls(COUNT), text("3 notes.", delay=2.5))  # the model thinks long after the tool ran
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())], env={"CHATOPS_PROGRESS_AFTER": "1"})
    await bot.send(mention("count the notes"))
    (posted,) = await fake_slack.wait_for("chat.postMessage", timeout=10)  # about a second in, mid-run
    assert posted.params["text"] == "Running count_notes…"
    assert len(model.requests) == 2  # the answer was not there yet
    await bot.settle()
    (answer,) = bot.replies()
    assert answer["text"] == "3 notes." and progress_texts(fake_slack) == ["Running count_notes…", "3 notes."]


async def test_a_slow_model_edits_the_progress_message_instead_of_adding_one(slack_bot, fake_slack, model):
    model.script(text("finally", delay=1.5))
    bot = await slack_bot(env={"CHATOPS_MODEL_NOTICE_AFTER": "0.1"})
    await bot.send(mention("hi"))
    await bot.settle()
    (answer,) = bot.replies()
    assert answer["text"] == "finally"
    assert progress_texts(fake_slack) == [
        "Still waiting for the language model… I will answer here as soon as it replies.",
        "finally",
    ]


async def test_a_long_answer_streams_and_the_progress_message_goes(slack_bot, fake_slack, model):
    model.script(calls(COUNT), text(LONG))
    fake_slack.add_user(ALICE, "Alice")
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    root = next_ts()
    await bot.send(mention("report", ts=root))
    await bot.settle()

    (start,) = fake_slack.calls_to("chat.startStream")
    assert (start.params["thread_ts"], start.params["recipient_user_id"]) == (root, ALICE)
    assert len(fake_slack.calls_to("chat.appendStream")) >= 2
    assert len(fake_slack.calls_to("chat.stopStream")) == 1
    (answer,) = bot.replies()  # the progress line was removed; the streamed answer is complete
    assert answer["text"] == LONG and not answer["streaming"]
    assert len(fake_slack.calls_to("chat.delete")) == 1


async def test_when_slack_refuses_the_stream_the_answer_is_posted_plainly(slack_bot, fake_slack, model):
    model.script(calls(COUNT), text(LONG))
    fake_slack.fail("chat.startStream", "not_allowed_token_type")
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("report"))
    await bot.settle()
    (answer,) = bot.replies()  # in place of the progress message
    assert answer["text"] == LONG
    assert fake_slack.calls_to("chat.appendStream") == [] and fake_slack.calls_to("chat.delete") == []


async def test_a_stream_that_breaks_is_removed_and_the_answer_posted_once(slack_bot, fake_slack, model):
    model.script(calls(COUNT), text(LONG))
    fake_slack.fail("chat.appendStream", "internal_error", times=10)
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("report"))
    await bot.settle()
    assert len(fake_slack.calls_to("chat.startStream")) == 1
    (answer,) = bot.replies()  # the partial stream was deleted; the answer replaced the progress line
    assert answer["text"] == LONG


async def test_cancel_closes_the_progress_message_and_posts_nothing_new_for_it(slack_bot, fake_slack, model):
    model.script(calls(NOTE))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    root = next_ts()
    await bot.send(mention("write a note", ts=root))
    await bot.settle()
    (progress,) = bot.replies()
    assert progress["text"] == "Asked for approval of 1 action(s): see the card(s) below."

    await bot.send(mention("cancel", thread_ts=root))
    await bot.settle()
    texts = [r["text"] for r in bot.replies()]
    assert texts[0] == "Stopped." and fake_slack.messages[progress["ts"]]["text"] == "Stopped."
    assert texts[1].startswith("Stopped. 1 pending approval(s) cancelled")  # the command's own answer
    assert len(texts) == 2


async def test_after_a_decision_a_quick_run_just_answers_and_a_slow_one_says_it_is_working(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored the note."), calls(NOTE), text("Stored it again.", delay=2.5))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)], env={"CHATOPS_PROGRESS_AFTER": "1"})  # the default
    for answer in ("Stored the note.", "Stored it again."):
        before = len(progress_texts(fake_slack))
        await bot.send(mention("write a note"))
        await bot.settle()
        await bot.send(click(card_message(fake_slack)))
        await bot.settle()
        after_click = progress_texts(fake_slack)[before:]
        assert after_click[-1] == answer
    assert len(ledger.effects) == 2
    quick, slow = progress_texts(fake_slack)[: -len(after_click)], after_click
    assert "Decided; working on the result…" not in quick  # answered within a second of the decision
    assert slow[-2:] == ["Decided; working on the result…", "Stored it again."]  # the line, then the answer in its place
