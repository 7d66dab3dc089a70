"""The Slack bot scopes the code needs, derived from the Web API methods it calls and the events it
subscribes to. `manifest.yml` asks for exactly these (checked by `tests/test_slack_manifest.py`,
which also finds every method the code calls), and `chatops doctor` compares them with the scopes
Slack says the token has (`x-oauth-scopes` on `auth.test`).
"""

from __future__ import annotations

# Web API method (as slack_sdk names it) -> the bot scope it needs (None: no scope).
METHOD_SCOPES: dict[str, str | None] = {
    "auth_test": None,
    "apps_connections_open": None,  # the app-level token's `connections:write`, not a bot scope
    "chat_postMessage": "chat:write",
    "chat_postEphemeral": "chat:write",
    "chat_update": "chat:write",
    "chat_delete": "chat:write",  # the bot's own progress message, once a streamed answer replaced it
    "chat_startStream": "chat:write",  # long answers, streamed
    "chat_appendStream": "chat:write",
    "chat_stopStream": "chat:write",
    "reactions_add": "reactions:write",
    "usergroups_users_list": "usergroups:read",
    "users_info": "users:read",
    "views_open": None,
    "views_publish": None,  # the App Home tab
}
# Subscribed bot event -> the scope that delivers it.
EVENT_SCOPES: dict[str, str | None] = {
    "app_mention": "app_mentions:read",
    "message.im": "im:history",
    "app_home_opened": None,  # the App Home tab; no scope
}
# The `/chatops` slash command in manifest.yml (help | pending | cancel).
COMMAND_SCOPES: frozenset[str] = frozenset({"commands"})

NEEDED_BOT_SCOPES: frozenset[str] = frozenset(
    {scope for scope in (*METHOD_SCOPES.values(), *EVENT_SCOPES.values()) if scope} | COMMAND_SCOPES
)
