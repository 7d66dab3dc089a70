"""The Slack Web API client and what we learn through it: who the bot is, and users' names.

What belongs here: building the one `AsyncWebClient` (base URL from SLACK_API_URL, bounded
retries: a connection error once, a 429 up to `RATE_LIMIT_RETRIES` times honouring
Retry-After, one aiohttp session whose connections are kept alive between calls), the cached
`auth.test` identity Bolt authorises with, and a small in-memory cache of display names. The
cache only saves API calls; nothing depends on it surviving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from slack_bolt.authorization import AuthorizeResult
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Settings
from bot.core.errors import ConfigError
from bot.slack.api_error import error_code
from bot.slack.events import Author

log = logging.getLogger("chatops.slack")

RATE_LIMIT_RETRIES = 3
HTTP_TIMEOUT = 15
NAME_LOOKUP_TIMEOUT = 1.0
NAME_TTL = 3600.0
NAME_CACHE_SIZE = 10_000
REJECTED_TOKEN_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"})


class SlackUnavailable(Exception):
    """Slack's API could not tell us who the bot is; the delivery is answered with an error (and retried)."""


def make_client(settings: Settings, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """The bot-token client every API call (and Bolt itself) uses. Without `session`, slack_sdk
    opens a new aiohttp session, and so a new connection (a TLS handshake with Slack), per call."""
    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    return AsyncWebClient(
        token=token,
        base_url=settings.slack_api_url,
        timeout=HTTP_TIMEOUT,
        session=session,
        retry_handlers=[
            # Only a connection that could not be made is tried again here: a timeout or a dropped
            # connection may come after Slack took the request, and chat.postMessage is not idempotent
            # (the outbox tries again itself, saying so in the log, instead of posting twice unsaid).
            AsyncConnectionErrorRetryHandler(max_retry_count=1, error_types=[aiohttp.ClientConnectorError]),
            AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
        ],
    )


class BotIdentity:
    """`auth.test`, asked once and remembered; Bolt's `authorize` reads it on every request."""

    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client
        self._result: AuthorizeResult | None = None
        self._lock = asyncio.Lock()

    @property
    def bot_user_id(self) -> str | None:
        return self._result.bot_user_id if self._result else None

    async def load(self) -> AuthorizeResult:
        """The identity; raises ConfigError for a rejected token, SlackUnavailable otherwise."""
        if self._result is not None:
            return self._result
        async with self._lock:
            if self._result is None:
                try:
                    response = await self.client.auth_test()
                except SlackApiError as exc:
                    error = error_code(exc)
                    if error in REJECTED_TOKEN_ERRORS:
                        raise ConfigError("SLACK_BOT_TOKEN", f"was rejected by Slack ({error})") from None
                    raise SlackUnavailable(f"auth.test failed: {error}") from None
                except Exception as exc:  # noqa: BLE001 - network trouble: the caller answers non-2xx
                    raise SlackUnavailable(f"auth.test failed: {type(exc).__name__}") from None
                self._result = AuthorizeResult.from_auth_test_response(auth_test_response=response, bot_token=self.client.token)
        return self._result

    def authorize_hook(self) -> Callable[..., Awaitable[AuthorizeResult]]:
        """Bolt's `authorize` function. Raising (not returning None) makes Bolt answer 500, so Slack retries."""

        async def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
            try:
                return await self.load()
            except ConfigError as exc:
                raise SlackUnavailable(str(exc)) from None

        return authorize


class UserDirectory:
    """Display names, the bot flag, locale and time zone from `users.info`, cached; a slow or failing lookup yields nothing."""

    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client
        self._cache: dict[str, tuple[float, Author]] = {}

    async def author(self, user_id: str) -> Author:
        now = time.monotonic()
        cached = self._cache.get(user_id)
        if cached is not None and now - cached[0] < NAME_TTL:
            return cached[1]
        try:
            response = await asyncio.wait_for(self.client.users_info(user=user_id, include_locale=True), NAME_LOOKUP_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the name is cosmetic; identity is the id
            log.debug("users.info for %s failed: %s", user_id, type(exc).__name__)
            return Author()
        user = response.get("user") or {}
        profile = user.get("profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or user.get("real_name") or user.get("name")
        author = Author(
            name=str(name) if name else None,
            is_bot=bool(user.get("is_bot")),
            locale=user.get("locale") or None,
            tz=user.get("tz") or None,
        )
        if len(self._cache) >= NAME_CACHE_SIZE:
            self._cache.clear()
        self._cache[user_id] = (now, author)
        return author
