"""`manifest.yml` asks for exactly what the Slack adapter uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

MANIFEST = Path(__file__).resolve().parent.parent / "manifest.yml"
REQUIRED_SCOPES = {
    "app_mentions:read",
    "chat:write",
    "im:history",
    "im:read",
    "im:write",
    "reactions:write",
    "usergroups:read",  # `slack-group:S…` approvers: usergroups.users.list
    "users:read",
}
# Scopes the bot would only need for features it does not have (reading channel history, posting as users).
UNNEEDED_SCOPES = {"channels:read", "chat:write.customize", "chat:write.public", "admin", "files:write", "usergroups:write"}


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def test_the_bot_has_the_scopes_it_uses_and_no_more(manifest):
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert scopes >= REQUIRED_SCOPES
    assert not scopes & UNNEEDED_SCOPES
    assert "user" not in manifest["oauth_config"]["scopes"]  # no user token


def test_it_hears_mentions_and_dms_only(manifest):
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == {"app_mention", "message.im"}


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
