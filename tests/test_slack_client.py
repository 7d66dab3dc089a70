"""The real `AsyncWebClient` (as the adapter builds it) against the fake Slack Web API."""

from __future__ import annotations

import logging

import pytest
from slack_sdk.errors import SlackApiError

from bot.config import Settings
from bot.core.errors import ConfigError
from bot.slack import SlackAdapter
from bot.slack.client import RATE_LIMIT_RETRIES, BotIdentity, SlackUnavailable, UserDirectory, make_client
from tests.fakes.slack_api import BOT_ID, BOT_USER_ID, TEAM_ID
from tests.slack_helpers import (
    ALICE,
    BOT_TOKEN,
    fake_slack_fixture,  # noqa: F401 - fixtures
    slack_env,
)


def client_for(fake, token: str = BOT_TOKEN):
    settings = Settings.model_validate({"SLACK_BOT_TOKEN": token, "SLACK_API_URL": fake.url})
    return make_client(settings)


async def test_calls_are_recorded_with_their_parameters_and_answered_like_slack(fake_slack):
    client = client_for(fake_slack)
    posted = await client.chat_postMessage(channel="C1", text="hi", thread_ts="1.0", blocks=[{"type": "divider"}])
    assert posted["ok"] and posted["ts"]
    await client.chat_update(channel="C1", ts=posted["ts"], text="edited", blocks=[])
    await client.reactions_add(channel="C1", timestamp="1.0", name="eyes")
    replies = await client.conversations_replies(channel="C1", ts="1.0")
    assert [m["text"] for m in replies["messages"]] == ["edited"]
    call = fake_slack.calls_to("chat.postMessage")[0]
    assert call.token == BOT_TOKEN
    assert call.params == {"channel": "C1", "text": "hi", "thread_ts": "1.0", "blocks": [{"type": "divider"}]}
    assert fake_slack.calls_to("reactions.add")[0].params == {"channel": "C1", "timestamp": "1.0", "name": "eyes"}
    with pytest.raises(SlackApiError) as refused:
        await client_for(fake_slack, token="").auth_test()
    assert refused.value.response["error"] == "not_authed"


async def test_a_429_is_waited_out_and_the_message_posted_once(fake_slack):
    client = client_for(fake_slack)
    fake_slack.rate_limit("chat.postMessage", times=2, retry_after=0)
    await client.chat_postMessage(channel="C1", text="once")
    attempts = fake_slack.calls_to("chat.postMessage", ok_only=False)
    assert [c.status for c in attempts] == [429, 429, 200]
    assert [m["text"] for m in fake_slack.messages.values()] == ["once"]


async def test_retries_on_429_are_bounded(fake_slack):
    client = client_for(fake_slack)
    fake_slack.rate_limit("chat.postMessage", times=RATE_LIMIT_RETRIES + 5, retry_after=0)
    with pytest.raises(SlackApiError) as limited:
        await client.chat_postMessage(channel="C1", text="never")
    assert limited.value.response.status_code == 429
    assert len(fake_slack.calls_to("chat.postMessage", ok_only=False)) == RATE_LIMIT_RETRIES + 1
    assert fake_slack.messages == {}


async def test_the_bot_identity_is_asked_once(fake_slack):
    identity = BotIdentity(client_for(fake_slack))
    first = await identity.load()
    assert (first.bot_user_id, first.bot_id, first.team_id, first.bot_token) == (BOT_USER_ID, BOT_ID, TEAM_ID, BOT_TOKEN)
    assert await identity.load() is first
    assert len(fake_slack.calls_to("auth.test")) == 1
    assert identity.bot_user_id == BOT_USER_ID


async def test_a_rejected_token_is_a_config_error_and_an_outage_is_retryable(fake_slack):
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN was rejected by Slack"):
        await BotIdentity(client_for(fake_slack, token="xoxp-wrong-kind")).load()
    fake_slack.fail("auth.test", "internal_error")
    identity = BotIdentity(client_for(fake_slack))
    with pytest.raises(SlackUnavailable):
        await identity.load()
    assert (await identity.load()).bot_user_id == BOT_USER_ID  # asked again next time


async def test_display_names_are_looked_up_once_and_failures_yield_no_name(fake_slack):
    users = UserDirectory(client_for(fake_slack))
    fake_slack.add_user(ALICE, "Alice")
    fake_slack.add_user("U0DEPLOY", "deploybot", is_bot=True)
    assert (await users.author(ALICE)).name == "Alice"
    assert (await users.author(ALICE)).name == "Alice"
    assert len(fake_slack.calls_to("users.info")) == 1
    assert (await users.author("U0DEPLOY")).is_bot
    fake_slack.fail("users.info", "user_not_found")
    unknown = await users.author("U0GHOST")
    assert unknown.name is None and not unknown.is_bot


async def test_a_rejected_bot_token_stops_start_up_with_the_variable_named(bots, fake_slack):
    fake_slack.fail("auth.test", "token_revoked")
    app = await bots.start(serve_http=True, **slack_env(fake_slack))
    app.add_adapter(SlackAdapter(app.core, app.settings))
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN was rejected by Slack \\(token_revoked\\)"):
        await bots.run(app)


async def test_the_adapter_starts_without_a_false_warning_when_the_token_is_in_the_environment(
    bots, fake_slack, monkeypatch, caplog
):
    """Bolt reads SLACK_BOT_TOKEN itself and warns that our (token-less, by design) client makes it
    unused: an operator would see that line at every start."""
    env = slack_env(fake_slack)
    monkeypatch.setenv("SLACK_BOT_TOKEN", env["SLACK_BOT_TOKEN"])
    caplog.set_level(logging.WARNING)
    app = await bots.start(serve_http=True, **env)
    app.add_adapter(SlackAdapter(app.core, app.settings))
    slack_warnings = [r for r in caplog.records if r.name.startswith("chatops.slack") and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in slack_warnings] == []
