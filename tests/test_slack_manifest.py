"""`manifest.yml` asks for exactly what the Slack adapter uses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bot.slack.scopes import EVENT_SCOPES, METHOD_SCOPES, NEEDED_BOT_SCOPES

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "manifest.yml"
REQUIRED_SCOPES = NEEDED_BOT_SCOPES
# Scopes the bot would only need for features it does not have (reading channel history, posting as users).
UNNEEDED_SCOPES = {
    "im:read",
    "im:write",
    "channels:read",
    "chat:write.customize",
    "chat:write.public",
    "admin",
    "files:write",
    "usergroups:write",
}


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def test_the_bot_has_the_scopes_it_uses_and_no_more(manifest):
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert scopes == REQUIRED_SCOPES
    assert not scopes & UNNEEDED_SCOPES
    assert "user" not in manifest["oauth_config"]["scopes"]  # no user token


def test_it_hears_mentions_dms_and_home_opens_only(manifest):
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == {"app_mention", "message.im", "app_home_opened"}


def test_the_home_tab_is_on_and_has_its_handler(manifest):
    assert manifest["features"]["app_home"]["home_tab_enabled"] is True
    handlers = (ROOT / "bot" / "slack" / "handlers.py").read_text(encoding="utf-8")
    assert 'app.event("app_home_opened")' in handlers  # a subscribed event someone listens to
    assert "views_publish" in handlers


def test_buttons_socket_mode_and_the_messages_tab_are_on(manifest):
    settings = manifest["settings"]
    assert settings["interactivity"]["is_enabled"] is True
    assert settings["socket_mode_enabled"] is True
    home = manifest["features"]["app_home"]
    assert home["messages_tab_enabled"] is True and home["messages_tab_read_only_enabled"] is False
    assert manifest["features"]["bot_user"]["display_name"]
    assert manifest["display_information"]["name"]


def test_the_http_mode_request_url_is_documented_as_our_route(manifest):
    text = MANIFEST.read_text(encoding="utf-8")
    assert "request_url: https://<your-host>/slack/events" in text


WEB_API_CALL = re.compile(
    r"\.((?:auth|apps|chat|reactions|usergroups|users|views|conversations|files|pins|team|im|bookmarks)_[A-Za-z]+)\("
)


def test_every_web_api_method_the_code_calls_has_its_scope_listed():
    called = set()
    for package in ("bot/slack", "tools"):  # the Feishu builders have look-alike names (chat_id)
        for path in (ROOT / package).rglob("*.py"):
            called.update(WEB_API_CALL.findall(path.read_text(encoding="utf-8")))
    assert called, "the scan found no Slack Web API call at all"
    assert called <= set(METHOD_SCOPES), f"methods without a scope entry: {sorted(called - set(METHOD_SCOPES))}"


def test_every_subscribed_event_has_its_scope(manifest):
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == set(EVENT_SCOPES)
