"""Slack test helpers: payload builders, Slack's real request signing, and a running Slack bot.

`SlackBot` is a bot built exactly as `chatops serve` builds it (the conftest `bots` factory),
with the real `SlackAdapter` mounted on the real HTTP server, its Web API client pointed at
`FakeSlackApi`, and a `send` that signs payloads with Slack's algorithm
(`SignatureVerifier.generate_signature`) and POSTs them to `/slack/events`.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from slack_sdk.signature import SignatureVerifier

from bot.app import App
from bot.slack import SlackAdapter
from bot.slack.events import APPROVE_ACTION, REASON_BLOCK, REASON_INPUT, REJECT_ACTION, REJECT_VIEW
from tests.fakes.slack_api import TEAM_ID, FakeSlackApi

SIGNING_SECRET = "test-signing-secret-0123456789"
BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-test-app-token"
ALICE, BOB = "U0ALICE", "U0BOB"
CHANNEL, DM = "C0OPS", "D0ALICE"

_ids = itertools.count(1)


def next_ts() -> str:
    return f"1710000000.{next(_ids):06d}"


def slack_env(fake: FakeSlackApi, *, socket: bool = False) -> dict[str, str]:
    env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": fake.url}
    env.update({"SLACK_APP_TOKEN": APP_TOKEN} if socket else {"SLACK_SIGNING_SECRET": SIGNING_SECRET})
    return env


# ---------------------------------------------------------------------- payloads
def event_body(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy",
        "team_id": TEAM_ID,
        "api_app_id": "A0CHATOPS",
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_ids):08d}",
        "event_time": int(time.time()),
        "event": event,
    }


def mention(
    text: str,
    *,
    user: str = ALICE,
    channel: str = CHANNEL,
    ts: str | None = None,
    thread_ts: str | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """An `app_mention` event callback; the text gets the bot's mention in front."""
    event = {
        "type": "app_mention",
        "user": user,
        "team": TEAM_ID,
        "text": f"<@U0BOT> {text}",
        "channel": channel,
        "ts": ts or next_ts(),
        "event_ts": ts or next_ts(),
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event_body(event, event_id)


def dm(text: str, *, user: str = ALICE, channel: str = DM, ts: str | None = None, **extra: Any) -> dict[str, Any]:
    """A `message` event in a DM (`channel_type: im`)."""
    event = {
        "type": "message",
        "channel_type": "im",
        "user": user,
        "team": TEAM_ID,
        "text": text,
        "channel": channel,
        "ts": ts or next_ts(),
        **extra,
    }
    return event_body(event)


def card_message(fake: FakeSlackApi) -> dict[str, Any]:
    """The newest message that carries approval buttons (or had them)."""
    cards = [m for m in fake.messages.values() if m.get("blocks") and "Approval needed" in json.dumps(m["blocks"])]
    assert cards, "no approval card was posted"
    return cards[-1]


def approval_id_of(message: dict[str, Any]) -> str:
    for block in message["blocks"]:
        for element in block.get("elements", []):
            if element.get("action_id") == APPROVE_ACTION:
                return str(element["value"])
    raise AssertionError("the card has no Approve button")


def interaction(kind: str, user: str = ALICE) -> dict[str, Any]:
    """What every interactivity payload from `user` carries (`block_actions`, `view_submission`...)."""
    return {
        "type": kind,
        "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": "A0CHATOPS",
        "token": "legacy",
        "trigger_id": f"trigger-{next(_ids)}",
    }


def click(message: dict[str, Any], *, user: str = ALICE, approve: bool = True) -> dict[str, Any]:
    """A `block_actions` payload for a click on the card's Approve or Reject button."""
    action_id = APPROVE_ACTION if approve else REJECT_ACTION
    return {
        **interaction("block_actions", user),
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": message["channel"]},
        "channel": {"id": message["channel"], "name": "ops"},
        "message": {"ts": message["ts"], "thread_ts": message.get("thread_ts"), "blocks": message["blocks"]},
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "chatops_decide",
                "value": approval_id_of(message),
                "action_ts": str(time.time()),
            }
        ],
    }


def reject_submission(view: dict[str, Any], reason: str | None, *, user: str = ALICE) -> dict[str, Any]:
    """A `view_submission` of the reject-reason modal the bot opened."""
    state = {"values": {REASON_BLOCK: {REASON_INPUT: {"type": "plain_text_input", "value": reason}}}}
    return {
        "type": "view_submission",
        "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": "A0CHATOPS",
        "token": "legacy",
        "trigger_id": f"trigger-{next(_ids)}",
        "view": {**view, "callback_id": REJECT_VIEW, "state": state},
    }


# ---------------------------------------------------------------------- signing
def signed(body: str, *, secret: str = SIGNING_SECRET, timestamp: str | None = None) -> dict[str, str]:
    """The two headers Slack adds, computed with Slack's own algorithm."""
    ts = timestamp or str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": str(signature)}


def encode(payload: dict[str, Any]) -> tuple[str, str]:
    """(body, content type) as Slack sends it: events as JSON, interactivity as a form field."""
    if payload.get("type") in ("block_actions", "view_submission"):
        return "payload=" + urllib.parse.quote(json.dumps(payload)), "application/x-www-form-urlencoded"
    return json.dumps(payload), "application/json"


@dataclass
class SlackBot:
    """A started bot with the Slack adapter, its fake Slack, and an HTTP client for `/slack/events`."""

    app: App
    adapter: SlackAdapter
    fake: FakeSlackApi
    http: aiohttp.ClientSession

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}/slack/events"

    async def send(
        self, payload: dict[str, Any], *, retry_num: int | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """POST a signed payload (or with `headers` replacing the signature headers); (status, body)."""
        body, content_type = encode(payload)
        sent = {"Content-Type": content_type, **(signed(body) if headers is None else headers)}
        if retry_num is not None:
            sent.update({"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"})
        async with self.http.post(self.events_url, data=body.encode(), headers=sent) as response:
            return response.status, await response.text()

    async def settle(self) -> None:
        """Wait until the core and the adapter have finished everything they started."""
        while len(self.app.ctx.tasks) or self.adapter._tasks:
            await self.app.ctx.tasks.idle()
            await self.adapter.idle()

    async def count(self, table: str, where: str = "1=1") -> int:
        async with self.app.ctx.db.transaction() as session:
            return int((await session.execute(sa.text(f"SELECT COUNT(*) FROM {table} WHERE {where}"))).scalar_one())

    def replies(self) -> list[dict[str, Any]]:
        """Plain (non-card) messages the bot posted, oldest first."""
        return [m for m in self.fake.messages.values() if not m.get("blocks")]


async def start_slack_bot(bots: Any, fake: FakeSlackApi, *, socket: bool = False, **kwargs: Any) -> SlackBot:
    """Build a bot with the conftest `bots` factory, mount the Slack adapter, start it."""
    env = {**slack_env(fake, socket=socket), **kwargs.pop("env", {})}
    app = await bots.start(serve_http=True, **kwargs, **env)
    adapter = SlackAdapter(app.core, app.settings)
    app.add_adapter(adapter)
    await bots.run(app)
    return SlackBot(app, adapter, fake, aiohttp.ClientSession())


# ---------------------------------------------------------------------- fixtures
# A test module imports `fake_slack_fixture` / `slack_bot_fixture`; tests ask for `fake_slack` / `slack_bot`.
@pytest.fixture(name="fake_slack")
async def fake_slack_fixture() -> AsyncIterator[FakeSlackApi]:
    async with FakeSlackApi() as fake:
        yield fake


@pytest.fixture(name="slack_bot")
async def slack_bot_fixture(bots: Any, fake_slack: FakeSlackApi) -> AsyncIterator[Callable[..., Awaitable[SlackBot]]]:
    """`await slack_bot(toolsets=[...], socket=False, env={...})` -> a started `SlackBot`."""
    started: list[SlackBot] = []

    async def start(**kwargs: Any) -> SlackBot:
        bot = await start_slack_bot(bots, fake_slack, **kwargs)
        started.append(bot)
        return bot

    yield start
    for bot in started:
        await bot.http.close()
