"""Findings of the PostgreSQL chaos campaign (`benchmarks/chaos_pg.py`), each reduced to one test."""

from __future__ import annotations

from tests.fakes.openai_server import calls, text
from tests.slack_helpers import fake_slack_fixture, mention, slack_bot_fixture  # noqa: F401 - fixtures
from tests.support_tools import Ledger, notes_toolset

COUNT = ("count_notes", {"topic": "ops"})
LONG = "\n".join(f"Line {i}: the service web-{i} restarted cleanly and answers health checks." for i in range(60))


async def test_a_stream_broken_by_a_plain_text_500_is_removed_and_the_answer_posted_once(slack_bot, fake_slack, model):
    """Slack's edge answers 5xx with an HTML or plain-text page. The bot read `exc.response.get("error")`
    of such an answer, whose data is a str: AttributeError inside the handler that removes a broken
    stream, so the half-streamed answer stayed in the thread and the outbox posted the answer again."""
    model.script(calls(COUNT), text(LONG))
    fake_slack.server_error("chat.appendStream", times=1)
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("report"))
    await fake_slack.wait_until(lambda: any(m.get("text") == LONG and not m.get("streaming") for m in bot.replies()), timeout=30)
    await bot.settle()
    assert [m["text"] for m in bot.replies()] == [LONG]  # the partial stream was deleted, nothing doubled
    assert len(fake_slack.calls_to("chat.startStream")) == 1


async def test_a_plain_text_500_on_a_reply_is_reported_as_slacks_answer(slack_bot, fake_slack, model, caplog):
    """The outbox names the fault ("Slack answered HTTP 500"), not "AttributeError", and the answer lands."""
    model.script(text("pong"))
    fake_slack.server_error("chat.postMessage", times=1)
    bot = await slack_bot()
    await bot.send(mention("ping"))
    await fake_slack.wait_until(lambda: any(m.get("text") == "pong" for m in bot.replies()), timeout=30)
    await bot.settle()
    assert "AttributeError" not in caplog.text
