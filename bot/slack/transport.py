"""How Slack requests reach the listeners: one Bolt `AsyncApp`, two doors.

What belongs here: building the `AsyncApp` (our client, our `authorize`, `process_before_response`),
the HTTP door (`POST /slack/events` on the shared aiohttp server, for Events API and
interactivity alike) and the Socket Mode door (`AsyncSocketModeHandler`). Both doors dispatch into
the same app, so there is exactly one copy of the handling logic.

The HTTP door checks the signature itself before Bolt sees the request (Bolt checks it again):
a missing, forged, stale (> 5 minutes) or malformed (`X-Slack-Request-Timestamp: abc`) signature
gets 401 with no side effect, and the body is never logged (Bolt's own verifier logs it at INFO,
so its message is filtered out). A signed body whose shape is wrong (`payloads.py`) gets 400 and
an audit row, before Bolt or a listener can trip over it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.core import metrics
from bot.core.errors import ConfigError
from bot.slack.api_error import error_code
from bot.slack.client import REJECTED_TOKEN_ERRORS, BotIdentity
from bot.slack.payloads import Malformed, check_body

log = logging.getLogger("chatops.slack")

EVENTS_PATH = "/slack/events"
MAX_TIMESTAMP_DIGITS = 12  # seconds since 1970 have 10 digits until the year 2286
_BOLT_VERIFIER_LOGGER = "slack_bolt.RequestVerification"
_BOLT_LOGGER = "chatops.slack.bolt"  # the logger our Bolt app logs to
CONNECT_ATTEMPT_TIMEOUT = 10.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
CLOSE_TIMEOUT = 2.0


class _NoSignatureBodies(logging.Filter):
    """Drops Bolt's 'Invalid request signature detected (... body: ...)' records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid request signature")


class _NoUnusedTokenWarning(logging.Filter):
    """Drops Bolt's 'As you gave `client` as well, `token` will be unused.': Bolt reads SLACK_BOT_TOKEN
    from the environment although it gets our token-less client on purpose (`build_bolt_app`), and
    would say so at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


class _OneLine(logging.Filter):
    """The Socket Mode client logs every failed (re)connect with a traceback: keep the line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _silence_bolt_false_alarms() -> None:
    for name, kind in ((_BOLT_VERIFIER_LOGGER, _NoSignatureBodies), (_BOLT_LOGGER, _NoUnusedTokenWarning)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def build_bolt_app(client: AsyncWebClient, identity: BotIdentity, signing_secret: str | None) -> AsyncApp:
    """The Bolt app. Listeners run to completion before the response (`process_before_response`)."""
    _silence_bolt_false_alarms()
    # Bolt gets a token-less twin of our client: it copies base URL and retries into its per-request
    # clients and sets the token from `authorize` (our cached auth.test), never calling auth.test itself.
    twin = AsyncWebClient(
        base_url=client.base_url, timeout=client.timeout, retry_handlers=client.retry_handlers, session=client.session
    )
    return AsyncApp(
        name="chatops.slack.app",
        client=twin,
        authorize=identity.authorize_hook(),
        signing_secret=signing_secret or "",
        process_before_response=True,
        logger=logging.getLogger(_BOLT_LOGGER),
    )


def signature_ok(verifier: SignatureVerifier, body: bytes, headers: Mapping[str, str]) -> bool:
    """Slack's v0 HMAC over `v0:<timestamp>:<body>`, within 5 minutes; any malformed input is False."""
    timestamp = (headers.get("X-Slack-Request-Timestamp") or "").strip()
    signature = headers.get("X-Slack-Signature")
    if not signature or not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > MAX_TIMESTAMP_DIGITS:
        return False
    try:
        return verifier.is_valid(body=body, timestamp=timestamp, signature=signature)
    except (ValueError, OverflowError, UnicodeDecodeError):
        return False


class HttpDoor:
    """`POST /slack/events`: verify, check the body's shape, then hand the request to Bolt.

    `on_refused(reason)` is awaited for a signed body that is malformed (the adapter audits it)."""

    def __init__(self, app: AsyncApp, signing_secret: str, on_refused: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.verifier = SignatureVerifier(signing_secret)
        self.on_refused = on_refused

    def routes(self) -> list[web.RouteDef]:
        return [web.post(EVENTS_PATH, self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        response = await self._answer(request)
        metrics.observe_ack("slack", response.status, time.perf_counter() - started)
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not signature_ok(self.verifier, body, request.headers):
            log.warning("slack: rejected a request with a missing, invalid or stale signature")
            return web.json_response({"error": "invalid request"}, status=401)
        try:
            check_body(body, request.headers.get("Content-Type", ""))
        except Malformed as exc:
            log.warning("slack: refused a signed but malformed request (%s)", exc)
            if self.on_refused is not None:
                await self.on_refused(str(exc))
            return web.json_response({"error": "malformed request"}, status=400)
        bolt_response = await self.app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(bolt_response)


class _TimedSocketModeHandler(AsyncSocketModeHandler):
    """Bolt's Socket Mode handler, with each envelope's ack counted and timed."""

    async def handle(self, client: Any, req: Any) -> None:
        started = time.perf_counter()
        status = 500
        try:
            await super().handle(client, req)
            status = 200
        finally:
            metrics.observe_ack("slack", status, time.perf_counter() - started)


class SocketDoor:
    """Socket Mode: Slack pushes the same payloads over a WebSocket opened with the app token.

    `start` asks for a WebSocket URL once, so a rejected app token stops start-up; the connection
    itself is made by a background task that retries with exponential backoff and logs one line
    per failed attempt, so an unreachable Slack never blocks start-up or shutdown.
    """

    def __init__(self, app: AsyncApp, app_token: str) -> None:
        logger = logging.getLogger("chatops.slack.socket")
        if not any(isinstance(f, _OneLine) for f in logger.filters):
            logger.addFilter(_OneLine())
        self.handler = _TimedSocketModeHandler(app, app_token, logger=logger)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        client = self.handler.client
        try:
            async with asyncio.timeout(CONNECT_ATTEMPT_TIMEOUT):
                client.wss_uri = await client.issue_new_wss_url()  # the first connect attempt uses it
        except SlackApiError as exc:
            error = error_code(exc, "")
            if error in REJECTED_TOKEN_ERRORS:
                raise ConfigError("SLACK_APP_TOKEN", f"was rejected by Slack ({error})") from None
            log.warning("slack: Socket Mode URL not issued yet (%s); connecting in the background", error or "error")
        except Exception as exc:  # noqa: BLE001 - unreachable: the background loop keeps trying
            log.warning("slack: Slack is unreachable for Socket Mode (%s); connecting in the background", type(exc).__name__)
        self._task = asyncio.create_task(self._connect_loop(), name="slack-socket-connect")

    async def _connect_loop(self) -> None:
        client = self.handler.client
        delay = FIRST_BACKOFF
        attempt = 1
        while not client.closed:
            try:
                async with asyncio.timeout(CONNECT_ATTEMPT_TIMEOUT):
                    if client.wss_uri is None:
                        client.wss_uri = await client.issue_new_wss_url()
                    await client.connect()
                if await client.is_connected():
                    log.info("slack: Socket Mode connected")
                    return
                problem = "not connected"
            except SlackApiError as exc:
                problem = error_code(exc, "error")
            except Exception as exc:  # noqa: BLE001 - network trouble: one line, then back off
                problem = type(exc).__name__
            log.warning("slack: Socket Mode connect attempt %d failed (%s); next in %.0fs", attempt, problem, delay)
            client.wss_uri = None  # a fresh URL for the next attempt (they are single-use)
            await asyncio.sleep(delay)
            delay, attempt = min(delay * 2, MAX_BACKOFF), attempt + 1

    async def connected(self) -> bool:
        return bool(await self.handler.client.is_connected())

    async def stop(self) -> None:
        self.handler.client.closed = True  # the SDK's own retry loops end at their next turn
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.handler.close_async()  # type: ignore[no-untyped-call]  # slack-bolt leaves it unannotated
        except Exception as exc:  # noqa: BLE001 - closing a dead socket
            log.warning("slack: closing Socket Mode: %s", type(exc).__name__)
