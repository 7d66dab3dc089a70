"""The Slack channel adapter: `SlackAdapter(core, settings)`.

Layout of the package (each module says what belongs in it):
- `events.py`    Slack payloads -> `IncomingMessage` / `DecisionRequest` (pure functions);
- `blocks.py`    `CardView` -> Block Kit, the reject-reason modal, safe message text;
- `client.py`    the `AsyncWebClient` (base URL, bounded 429 retries), `auth.test`, user names;
- `groups.py`    user-group memberships for the policy's `slack-group:` entries (`usergroups.users.list`);
- `handlers.py`  the Bolt listeners, one core call each (and the App Home, rendered by `home.py`);
- `stream.py`    a long answer through Slack's streaming API, with a plain post as fallback;
- `transport.py` the Bolt app and its two doors: `POST /slack/events` and Socket Mode;
- `poster.py`    the `tools.services.SlackPoster` the notification tool posts with;
- `api_error.py` the error code of a failed Web API call, also when Slack's answer was no JSON.

This module is the `Channel` the core talks to (post a reply, react, post and update a card or a
clicked private copy of it, the run's progress message and its answer, a person's App Home) plus the adapter's lifecycle. Socket Mode is used when SLACK_APP_TOKEN is set; otherwise the
HTTP route is mounted and SLACK_SIGNING_SECRET verifies every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.config import Settings
from bot.core.channels import CardView, DeliveryFailed
from bot.core.engine import Core
from bot.core.events import Thread, User
from bot.core.refusals import record_refused_request
from bot.slack.api_error import error_code
from bot.slack.blocks import card_blocks, card_text, safe_message, split_message
from bot.slack.client import HTTP_TIMEOUT, REJECTED_TOKEN_ERRORS, BotIdentity, SlackUnavailable, UserDirectory, make_client
from bot.slack.groups import SlackGroups
from bot.slack.handlers import SlackHandlers
from bot.slack.stream import STREAM_AFTER, stream_answer
from bot.slack.transport import HttpDoor, SocketDoor, build_bolt_app

__all__ = ["SlackAdapter"]

log = logging.getLogger("chatops.slack")

WORKING_REACTION = "eyes"
STOP_TIMEOUT = 3.0
AUTH_RECHECK = 60.0  # seconds between two auth.test calls made for /readyz


class SlackAdapter:
    """Slack for the core: translates in (through Bolt) and renders out (through the Web API)."""

    platform = "slack"

    def __init__(self, core: Core, settings: Settings, *, client: AsyncWebClient | None = None) -> None:
        self.core = core
        # One session for every Web API call of this process (made here: the adapter is built in
        # the running loop), closed by `close()` when the bot has stopped delivering.
        # Its own timeout: slack_sdk applies the client's `timeout` only to sessions it makes itself
        # (one it is given keeps aiohttp's 5 minutes, which outlived an outbox job's claim).
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) if client is None else None
        self.client = client or make_client(settings, self._session)
        self.identity = BotIdentity(self.client)
        self.users = UserDirectory(self.client)
        self.groups = SlackGroups(self.client, lambda: core.ctx.policy.group_refs("slack"))
        secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
        self.bolt = build_bolt_app(self.client, self.identity, secret)
        self.handlers = SlackHandlers(core, self.client, self.identity, self.users, self.groups, self._spawn)
        self.handlers.register(self.bolt)
        app_token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else None
        self.socket = SocketDoor(self.bolt, app_token) if app_token else None
        self.http = HttpDoor(self.bolt, secret, self._refused) if self.socket is None and secret else None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.auth_recheck = AUTH_RECHECK
        self._auth_checked: float | None = None
        self._auth_problem: str | None = None

    @property
    def mode(self) -> str:
        """The transport in use: socket, http, or off (neither an app token nor a signing secret)."""
        return "socket" if self.socket else "http" if self.http else "off"

    async def _refused(self, reason: str) -> None:
        await record_refused_request(self.core.ctx, self.platform, reason)

    # ------------------------------------------------------------------ lifecycle
    def routes(self) -> list[web.RouteDef]:
        return self.http.routes() if self.http is not None else []

    async def start(self) -> None:
        """Learn who the bot is (a rejected token stops start-up), then connect Socket Mode if used."""
        try:
            identity = await self.identity.load()
            log.info("slack: connected as %s in team %s (%s mode)", identity.bot_user_id, identity.team_id, self.mode)
        except SlackUnavailable as exc:
            log.warning("slack: %s; will ask again on the first request", exc)
        if self.socket is not None:
            await self.socket.start()

    async def open_for_delivery(self) -> None:
        """A worker posts through the Web API client alone: nothing to connect."""

    async def not_ready(self) -> list[str]:
        """auth.test passed (asked again every `auth_recheck` seconds) and, in Socket Mode, the socket is up."""
        problems = []
        checked = self._auth_checked
        if checked is None or time.monotonic() - checked >= self.auth_recheck or self._auth_problem:
            self._auth_problem = await self._check_auth()
            self._auth_checked = time.monotonic()
        if self._auth_problem:
            problems.append(self._auth_problem)
        if self.socket is not None and not await self.socket.connected():
            problems.append("Socket Mode is not connected")
        return problems

    async def _check_auth(self) -> str | None:
        try:
            await self.client.auth_test()
        except SlackApiError as exc:
            error = error_code(exc, "error")
            if error in REJECTED_TOKEN_ERRORS:
                return f"SLACK_BOT_TOKEN was rejected by Slack ({error})"
            return f"auth.test failed ({error})"
        except Exception as exc:  # noqa: BLE001 - unreachable or timed out
            return f"auth.test failed ({type(exc).__name__})"
        if self.identity.bot_user_id is None:
            with contextlib.suppress(Exception):
                await self.identity.load()
        return None

    async def stop(self) -> None:
        if self.socket is not None:
            await self.socket.stop()
        await self.groups.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.idle()
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()

    async def close(self) -> None:
        """After the last delivery: the Web API session and its kept-alive connections."""
        if self._session is not None:
            await self._session.close()

    async def idle(self) -> None:
        """Wait for the adapter's own background calls (ephemeral answers, modals)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("slack: %s failed: %s", task.get_name(), _describe(task.exception()))

    # ------------------------------------------------------------------ Channel
    async def post_reply(self, thread: Thread, text: str) -> None:
        coords = thread.coords
        for part in split_message(safe_message(text)):
            async with delivery():
                await self.client.chat_postMessage(
                    channel=coords["channel"], thread_ts=coords.get("thread_ts"), text=part, unfurl_links=False
                )

    async def show_working(self, thread: Thread) -> None:
        coords = thread.coords
        try:
            await self.client.reactions_add(channel=coords["channel"], timestamp=coords["ts"], name=WORKING_REACTION)
        except SlackApiError as exc:
            if error_code(exc) != "already_reacted":
                raise

    async def post_card(self, thread: Thread, card: CardView) -> str | None:
        coords = thread.coords
        async with delivery():
            response = await self.client.chat_postMessage(
                channel=coords["channel"], thread_ts=coords.get("thread_ts"), text=card_text(card), blocks=card_blocks(card)
            )
        ts = response.get("ts")
        return str(ts) if ts else None

    async def update_card(self, thread: Thread, message_id: str, card: CardView) -> None:
        """The card in its thread (`chat.update`), or a private copy of it through the `response_url`
        its click gave (`Core.card_copied`; Slack cannot edit an ephemeral message otherwise)."""
        if url := thread.coords.get("response_url"):
            hook = AsyncWebhookClient(str(url), timeout=HTTP_TIMEOUT, session=self._session)
            async with delivery():
                answer = await hook.send(replace_original=True, text=card_text(card), blocks=card_blocks(card))
            if answer.status_code != 200:
                raise DeliveryFailed(
                    f"Slack refused to replace a copy of the card (HTTP {answer.status_code}: {answer.body[:80]})"
                )
            return
        async with delivery():
            await self.client.chat_update(
                channel=thread.coords["channel"], ts=message_id, text=card_text(card), blocks=card_blocks(card)
            )

    # ------------------------------------------------------------------ progress, answers, home
    async def post_progress(self, thread: Thread, text: str) -> str | None:
        coords = thread.coords
        async with delivery():
            response = await self.client.chat_postMessage(
                channel=coords["channel"], thread_ts=coords.get("thread_ts"), text=safe_message(text), unfurl_links=False
            )
        ts = response.get("ts")
        return str(ts) if ts else None

    async def update_progress(self, thread: Thread, message_id: str, text: str) -> None:
        async with delivery():
            await self.client.chat_update(channel=thread.coords["channel"], ts=message_id, text=safe_message(text))

    async def post_answer(self, thread: Thread, text: str, progress_id: str | None) -> None:
        """The answer: streamed when long and the thread allows it (the progress message is then
        removed), else in place of the progress message (`chat.update`), else a plain post."""
        coords = thread.coords
        long = len(text) > STREAM_AFTER and coords.get("thread_ts")
        if long and await stream_answer(self.client, thread, safe_message(text)):
            if progress_id:
                await self._remove(coords["channel"], progress_id)
            return
        parts = split_message(safe_message(text))
        if progress_id is None:
            await self.post_reply(thread, text)
            return
        async with delivery():
            await self.client.chat_update(channel=coords["channel"], ts=progress_id, text=parts[0])
        for part in parts[1:]:
            async with delivery():
                await self.client.chat_postMessage(
                    channel=coords["channel"], thread_ts=coords.get("thread_ts"), text=part, unfurl_links=False
                )

    async def _remove(self, channel: str, ts: str) -> None:
        """Best effort: the streamed answer is already there, a leftover progress line is cosmetic."""
        try:
            await self.client.chat_delete(channel=channel, ts=ts)
        except Exception as exc:  # noqa: BLE001 - never post the answer twice over a cosmetic failure
            log.warning("slack: could not remove the progress message: %s", _describe(exc))

    async def publish_home(self, user: User) -> None:
        """Re-publish a person's App Home (a `home_refresh` job: an approval they see changed)."""
        async with delivery():
            await self.handlers.publish_home(user)


# Slack errors that no retry can fix: the post is given up at once (the outbox reports it).
PERMANENT_ERRORS = frozenset(
    {"channel_not_found", "not_in_channel", "is_archived", "invalid_blocks", "msg_too_long", "message_not_found",
     "cant_update_message", "invalid_auth", "account_inactive", "token_revoked", "missing_scope"}
)  # fmt: skip


@asynccontextmanager
async def delivery() -> AsyncIterator[None]:
    """Translate a Slack API failure into the core's `DeliveryFailed` (Retry-After, permanent or not)."""
    try:
        yield
    except SlackApiError as exc:
        error = error_code(exc)
        retry_after = exc.response.headers.get("Retry-After") if exc.response.status_code == 429 else None
        wait = float(retry_after) if retry_after and str(retry_after).isdigit() else None
        raise DeliveryFailed(f"Slack answered {error}", retry_after=wait, permanent=error in PERMANENT_ERRORS) from None
    except (TimeoutError, aiohttp.ServerDisconnectedError) as exc:  # the request went out: it may have landed
        raise DeliveryFailed(f"no answer from Slack ({type(exc).__name__}; it may have been posted)") from None


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, SlackApiError):
        return f"Slack answered {error_code(exc, 'an error')}"
    return type(exc).__name__
