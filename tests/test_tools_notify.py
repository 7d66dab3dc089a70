"""notify_feishu against a local robot webhook that checks signatures; notify_slack through a real
AsyncWebClient talking to the fake Slack Web API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.poster import SlackWebPoster
from storage.engine import Database
from tests.fakes.feishu_robot import FakeFeishuRobot
from tests.fakes.slack_api import FakeSlackApi
from tests.tool_env import tool_context
from tools import notify
from tools.config import HttpTimeouts
from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolInDoubt, ToolUnavailable
from tools.registry import PreparedCall, ToolRegistry
from tools.services import SlackPoster

REGISTRY = ToolRegistry(notify.toolset.specs)
MESSAGE = "部署完成 ✅ v1.2.3 is live"


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    database = Database(sqlite_url)
    yield database
    await database.dispose()


def context(db: Database, slack: SlackPoster | None = None, **env: str) -> ToolContext:
    return tool_context(db, approval_id="ap_n1", slack=slack, **env)


async def call(ctx: ToolContext, name: str, args: dict[str, Any]) -> Any:
    prepared = REGISTRY.prepare(name, json.dumps(args))
    assert isinstance(prepared, PreparedCall), prepared
    assert prepared.spec.check is not None
    await prepared.spec.check(ctx, prepared.args)
    return await prepared.spec.run(ctx, prepared.args)


def test_feishu_sign_matches_feishu_reference_example() -> None:
    # Pinned value, computed separately with the algorithm of Feishu's guide.
    assert notify.feishu_sign(1599360473, "demo") == "l1N0gAcBjdwBvGm1xMjOF0XSyaLRpR7tuO5dHfhAYc8="


async def test_feishu_signed_post(db: Database) -> None:
    async with FakeFeishuRobot() as robot:
        ctx = context(db, FEISHU_WEBHOOK_URL=robot.url, FEISHU_WEBHOOK_SECRET=robot.secret or "")
        assert await call(ctx, "notify_feishu", {"message": MESSAGE}) == {
            "result": "posted",
            "platform": "feishu",
            "message": "Posted to the Feishu group.",
        }
    assert robot.messages == [MESSAGE]
    (body,) = robot.requests
    assert set(body) == {"timestamp", "sign", "msg_type", "content"}
    assert body["msg_type"] == "text" and body["content"] == {"text": MESSAGE}


async def test_feishu_wrong_secret_is_refused_with_feishu_error(db: Database) -> None:
    async with FakeFeishuRobot() as robot:
        ctx = context(db, FEISHU_WEBHOOK_URL=robot.url, FEISHU_WEBHOOK_SECRET="not-the-secret")
        with pytest.raises(ToolError, match=r"code 19021.*sign match fail"):
            await call(ctx, "notify_feishu", {"message": MESSAGE})
    assert robot.messages == [] and len(robot.requests) == 1


async def test_feishu_unsigned_robot_and_configuration(db: Database) -> None:
    async with FakeFeishuRobot(secret=None) as robot:
        await call(context(db, FEISHU_WEBHOOK_URL=robot.url), "notify_feishu", {"message": "hello"})
    assert robot.requests == [{"msg_type": "text", "content": {"text": "hello"}}]
    with pytest.raises(ToolUnavailable, match="set FEISHU_WEBHOOK_URL"):
        await call(context(db), "notify_feishu", {"message": "hello"})
    with pytest.raises(ArgumentError, match="empty"):
        await call(context(db, FEISHU_WEBHOOK_URL=robot.url), "notify_feishu", {"message": "  "})
    with pytest.raises(ToolUnavailable, match="cannot be reached"):
        await call(context(db, FEISHU_WEBHOOK_URL=robot.url), "notify_feishu", {"message": "hello"})  # server closed


async def test_slack_post_through_the_web_api(db: Database) -> None:
    async with FakeSlackApi() as slack:
        poster = SlackWebPoster(AsyncWebClient(token="xoxb-test-token", base_url=slack.url))
        ctx = context(db, slack=poster)
        result = await call(ctx, "notify_slack", {"channel": "#ops", "message": MESSAGE})
        assert result["result"] == "posted" and result["channel"] == "#ops" and result["ts"]
        (posted,) = slack.calls_to("chat.postMessage")
        assert posted.token == "xoxb-test-token"
        assert posted.params["channel"] == "#ops" and posted.params["text"] == MESSAGE

        slack.fail("chat.postMessage", "not_in_channel")
        with pytest.raises(ToolError, match="Slack refused the message to #ops: not_in_channel \\(invite the bot"):
            await call(ctx, "notify_slack", {"channel": "#ops", "message": "again"})
        await poster.close()


async def test_slack_not_configured(db: Database) -> None:
    with pytest.raises(ToolUnavailable, match="set SLACK_BOT_TOKEN"):
        await call(context(db), "notify_slack", {"channel": "#ops", "message": "hi"})


def test_cards_describe_the_post() -> None:
    specs = {spec.name: spec for spec in notify.toolset.specs}
    assert not specs["notify_feishu"].read_only and not specs["notify_slack"].read_only
    assert specs["notify_slack"].sentence({"channel": "#ops", "message": MESSAGE}) == f"Post to Slack #ops: “{MESSAGE}”"
    long = "word " * 40
    assert specs["notify_feishu"].sentence({"message": long}).endswith("…”")


# ---- "not sent" (nothing can have been posted) vs "in doubt" (the request was sent, no answer) ----------


async def test_feishu_robot_that_reads_and_never_answers_is_in_doubt(db: Database) -> None:
    async with FakeFeishuRobot(secret=None, hang=True) as robot:
        ctx = context(db, FEISHU_WEBHOOK_URL=robot.url, CHATOPS_TOOL_TIMEOUT="2")
        with pytest.raises(ToolInDoubt, match=r"Feishu did not answer \(no answer in time\); the message may have been posted"):
            await call(ctx, "notify_feishu", {"message": "hello"})
        assert robot.hung.is_set()


async def test_feishu_robot_unreachable_is_not_sent(db: Database) -> None:
    async with FakeFeishuRobot(secret=None) as robot:
        url = robot.url
    with pytest.raises(ToolUnavailable, match=r"not sent: the Feishu webhook cannot be reached \(cannot connect") as caught:
        await call(context(db, FEISHU_WEBHOOK_URL=url), "notify_feishu", {"message": "hello"})
    assert not isinstance(caught.value, ToolInDoubt)


async def test_slack_post_not_sent_vs_in_doubt(db: Database) -> None:
    async with FakeSlackApi() as slack:
        url = slack.url
        poster = SlackWebPoster(AsyncWebClient(token="xoxb-test-token", base_url=url), HttpTimeouts(connect=1, read=1))
        slack.hang("chat.postMessage")
        with pytest.raises(ToolInDoubt, match=r"Slack did not answer \(no answer in time\); the message may have been posted"):
            await call(context(db, slack=poster), "notify_slack", {"channel": "#ops", "message": "hi"})
        assert slack.hung.is_set()
    with pytest.raises(ToolUnavailable, match=r"not sent: Slack cannot be reached \(cannot connect") as caught:
        await call(context(db, slack=poster), "notify_slack", {"channel": "#ops", "message": "hi"})
    assert not isinstance(caught.value, ToolInDoubt)
    await poster.close()


async def test_the_slack_card_says_where_a_link_really_goes_and_who_gets_notified(db: Database) -> None:
    """The card shows the message as typed, and Slack renders its markup: a link reading one address
    and opening another, and an @channel, reached the channel with no word on the card about either."""
    spec = next(s for s in notify.toolset.specs if s.name == "notify_slack")
    assert spec.preview is not None
    message = (
        "Expenses: <https://evil.test/phish|https://intranet.example.com/expenses> <!channel> "
        "cc <@U0BOB> <!subteam^S0OPS> and <https://docs.example.com> <https://x.test|x.test is fine?>"
    )
    lines = await spec.preview(context(db), {"channel": "#ops", "message": message})
    assert lines == [
        "Slack will show the link text “https://intranet.example.com/expenses”, which opens https://evil.test/phish",
        "Slack will notify everyone in the channel (@channel)",
        "Slack will mention @U0BOB",
        "Slack will notify the user group S0OPS",
        "Slack will show the link text “x.test is fine?”, which opens https://x.test",
    ]
    assert await spec.preview(context(db), {"channel": "#ops", "message": "plain words, no markup"}) == []
