"""The Slack implementation of `tools.services.SlackPoster`: what the notification tool posts with.

Its own `AsyncWebClient` twin (same token and base URL as the adapter's) on its own aiohttp
session with per-step timeouts and **no** retry handlers: `chat.postMessage` is not idempotent,
so a request is sent once. A failure while connecting cannot have posted anything; any later
failure (reset, read timeout) may have, and is reported as such.
"""

from __future__ import annotations

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from tools.config import HttpTimeouts
from tools.services import DeliveryError, PostedMessage, SlackRefused


class SlackWebPoster:
    """Posts as the bot. Create it with the adapter's client; `close()` when the bot stops."""

    def __init__(self, client: AsyncWebClient, timeouts: HttpTimeouts | None = None) -> None:
        self._token = client.token
        self._base_url = client.base_url
        self._timeouts = timeouts or HttpTimeouts()
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> AsyncWebClient:
        if self._session is None or self._session.closed:
            t = self._timeouts
            limit = aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect, sock_read=t.read)
            self._session = aiohttp.ClientSession(timeout=limit)
        return AsyncWebClient(token=self._token, base_url=self._base_url, session=self._session, retry_handlers=[])

    async def post_message(self, channel: str, text: str) -> PostedMessage:
        try:
            response = await self._client().chat_postMessage(channel=channel, text=text)
        except SlackApiError as exc:
            raise SlackRefused(str(exc.response.get("error", "unknown_error"))) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise DeliveryError(_reason(exc), may_have_arrived=False) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(_reason(exc), may_have_arrived=True) from None
        return PostedMessage(channel=response.get("channel"), ts=response.get("ts"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connection timed out"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return type(exc).__name__
