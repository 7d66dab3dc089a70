"""The Slack implementation of `tools.services.SlackPoster`: what the notification tool posts with.

Its own `AsyncWebClient` twin (same token and base URL as the adapter's) on its own aiohttp
session with per-step timeouts and **no** retry handlers: `chat.postMessage` is not idempotent,
so a request is sent once. A failure while connecting cannot have posted anything; any later
failure (reset, read timeout) may have, and is reported as such (the rule of `tools.http`).
"""

from __future__ import annotations

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.api_error import error_code
from tools import http
from tools.config import HttpTimeouts
from tools.services import DeliveryError, PostedMessage, SlackRefused


class SlackWebPoster:
    """Posts as the bot. Create it with the adapter's client; `close()` when the bot stops."""

    def __init__(self, client: AsyncWebClient, timeouts: HttpTimeouts | None = None) -> None:
        self._token = client.token
        self._base_url = client.base_url
        self._timeouts = timeouts or HttpTimeouts()
        self._session: aiohttp.ClientSession | None = None
        self._web: AsyncWebClient | None = None

    def _client(self) -> AsyncWebClient:
        """The twin client, made on first use (its session needs the running loop)."""
        if self._web is None or self._session is None or self._session.closed:
            self._session = http.session(self._timeouts)
            self._web = AsyncWebClient(token=self._token, base_url=self._base_url, session=self._session, retry_handlers=[])
        return self._web

    async def post_message(self, channel: str, text: str) -> PostedMessage:
        try:
            response = await self._client().chat_postMessage(channel=channel, text=text)
        except SlackApiError as exc:
            raise SlackRefused(error_code(exc)) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(http.describe(exc), may_have_arrived=not http.never_sent(exc)) from None
        return PostedMessage(channel=response.get("channel"), ts=response.get("ts"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
