"""The Feishu Open API calls the adapter makes, through lark-oapi's services (`sdk.ApiClient`).

What this adds to the SDK (1.7.5), each verified in its source:

- Import cost: only the `im`, `contact` and `cardkit` services are imported (`sdk.load`; the whole SDK takes
  seconds and ~146 MB), in a worker thread, once, by `open()`.
- Blocking I/O: the SDK fetches tenant tokens with `requests` even on its `a*` methods, so every
  call runs the sync method in `asyncio.to_thread`; `timeout` bounds each HTTP request (the
  token fetch included), and an outer `asyncio.wait_for` bounds the whole call.
- Token refresh: `TokenManager.cache` (through `sdk.py`) is process-global and never invalidated; when Feishu
  answers 99991661/99991663/99991668 the cached token is dropped and the call retried once.
  When Feishu refuses to issue a token at all (wrong app secret), `CredentialsRejected`.
- Rate limits: HTTP 429 or code 99991400 are retried after `x-ogw-ratelimit-reset` seconds (or
  exponential backoff), capped, at most `attempts` times; network errors and 5xx likewise.
  Sends carry a `uuid` idempotency key, so a retried send never posts twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from bot.feishu import sdk

log = logging.getLogger("chatops.feishu")

TOKEN_INVALID = frozenset({99991661, 99991663, 99991668})
RATE_LIMITED = 99991400


class FeishuApiError(Exception):
    """Feishu refused a call (after retries); `code` is Feishu's, `log_id` helps their support."""

    def __init__(self, what: str, code: int | None, message: str, log_id: str | None = None) -> None:
        super().__init__(f"{what} failed: code={code} {message} (log_id={log_id})")
        self.code = code
        self.log_id = log_id


class CredentialsRejected(FeishuApiError):
    """Feishu would not issue a tenant token for this app id and secret; retrying will not help."""


class FeishuApi:
    """Bot-identity API calls with timeouts, token refresh and bounded retries."""

    def __init__(
        self,
        *,
        app_id: str,
        app_secret: str,
        domain: str,
        timeout: float = 10.0,
        attempts: int = 4,
        max_backoff: float = 8.0,
    ) -> None:
        self.app_id = app_id
        self._secret = app_secret
        self.domain = domain.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.max_backoff = max_backoff
        self._client: Any = None
        self._model: Any = None
        self._enum: Any = None
        self._im: Any = None
        self._contact: Any = None
        self._cardkit: Any = None

    async def open(self) -> None:
        """Import lark-oapi and build the client (off the event loop: the import is slow)."""
        if self._client is None:
            await sdk.in_daemon_thread(self._build)

    def _build(self) -> None:
        self._im = sdk.load("lark_oapi.api.im.v1")
        self._contact = sdk.load("lark_oapi.api.contact.v3")
        self._cardkit = sdk.load("lark_oapi.api.cardkit.v1")
        self._model = sdk.load("lark_oapi.core.model")
        self._enum = sdk.load("lark_oapi.core.enum")
        self._client = sdk.ApiClient(self.app_id, self._secret, domain=self.domain, timeout=self.timeout)

    # ------------------------------------------------------------------ calls
    async def bot_open_id(self) -> str:
        """The bot's own open_id, from `GET /open-apis/bot/v3/info` (no SDK model for it)."""
        enum = self._enum
        request = (
            self._model.BaseRequest.builder()
            .http_method(enum.HttpMethod.GET)
            .uri("/open-apis/bot/v3/info")
            .token_types({enum.AccessTokenType.TENANT})
            .build()
        )
        response = await self._call("bot info", self._client.request, request)
        body = json.loads(response.raw.content.decode("utf-8"))
        open_id = (body.get("bot") or {}).get("open_id") if isinstance(body, dict) else None
        if not isinstance(open_id, str) or not open_id:
            raise FeishuApiError("bot info", None, "no bot.open_id in the answer")
        return open_id

    async def reply(self, message_id: str, msg_type: str, content: str, *, in_thread: bool, key: str | None = None) -> str:
        """Reply to `message_id` (in its thread when `in_thread`); returns the new message id."""
        body = self._im.ReplyMessageRequestBody(
            {"msg_type": msg_type, "content": content, "reply_in_thread": in_thread, "uuid": _key(key)}
        )
        request = self._im.ReplyMessageRequest.builder().message_id(message_id).request_body(body).build()
        response = await self._call("reply", self._client.im.v1.message.reply, request)
        return str(response.data.message_id)

    async def send(self, chat_id: str, msg_type: str, content: str, *, key: str | None = None, id_type: str = "chat_id") -> str:
        """Post a new message in a chat (or to a person: `id_type="open_id"`); returns its id."""
        body = self._im.CreateMessageRequestBody(
            {"receive_id": chat_id, "msg_type": msg_type, "content": content, "uuid": _key(key)}
        )
        request = self._im.CreateMessageRequest.builder().receive_id_type(id_type).request_body(body).build()
        response = await self._call("send", self._client.im.v1.message.create, request)
        return str(response.data.message_id)

    async def patch(self, message_id: str, content: str) -> None:
        """Replace a card the bot sent (`PATCH /open-apis/im/v1/messages/:id`)."""
        body = self._im.PatchMessageRequestBody({"content": content})
        request = self._im.PatchMessageRequest.builder().message_id(message_id).request_body(body).build()
        await self._call("patch", self._client.im.v1.message.patch, request)

    async def edit(self, message_id: str, msg_type: str, content: str) -> None:
        """Edit a text or post message the bot sent (`PUT /open-apis/im/v1/messages/:id`)."""
        body = self._im.UpdateMessageRequestBody({"msg_type": msg_type, "content": content})
        request = self._im.UpdateMessageRequest.builder().message_id(message_id).request_body(body).build()
        await self._call("edit", self._client.im.v1.message.update, request)

    async def recall(self, message_id: str) -> None:
        """Withdraw a message the bot sent (`DELETE /open-apis/im/v1/messages/:id`)."""
        request = self._im.DeleteMessageRequest.builder().message_id(message_id).build()
        await self._call("recall", self._client.im.v1.message.delete, request)

    # ------------------------------------------------------------------ CardKit (streaming cards)
    async def create_card(self, card: dict[str, Any]) -> str:
        """A card entity (`POST /open-apis/cardkit/v1/cards`); returns its card_id."""
        body = self._cardkit.CreateCardRequestBody({"type": "card_json", "data": json.dumps(card, ensure_ascii=False)})
        request = self._cardkit.CreateCardRequest.builder().request_body(body).build()
        response = await self._call("card create", self._client.cardkit.v1.card.create, request)
        return str(response.data.card_id)

    async def stream_text(self, card_id: str, element_id: str, content: str, sequence: int) -> None:
        """The element's full text so far; the client types out what is new (`PUT .../elements/:id/content`)."""
        body = self._cardkit.ContentCardElementRequestBody(
            {"content": content, "sequence": sequence, "uuid": f"{card_id}-{sequence}"}
        )
        request = (
            self._cardkit.ContentCardElementRequest.builder().card_id(card_id).element_id(element_id).request_body(body).build()
        )
        await self._call("card stream", self._client.cardkit.v1.card_element.content, request)

    async def card_settings(self, card_id: str, settings: dict[str, Any], sequence: int) -> None:
        """Change a card entity's `config` (e.g. end streaming mode: `PATCH .../cards/:id/settings`)."""
        body = self._cardkit.SettingsCardRequestBody(
            {"settings": json.dumps(settings), "sequence": sequence, "uuid": f"{card_id}-{sequence}"}
        )
        request = self._cardkit.SettingsCardRequest.builder().card_id(card_id).request_body(body).build()
        await self._call("card settings", self._client.cardkit.v1.card.settings, request)

    async def react(self, message_id: str, emoji: str) -> None:
        """Add an emoji reaction to a message."""
        body = self._im.CreateMessageReactionRequestBody({"reaction_type": {"emoji_type": emoji}})
        request = self._im.CreateMessageReactionRequest.builder().message_id(message_id).request_body(body).build()
        await self._call("reaction", self._client.im.v1.message_reaction.create, request)

    async def user_departments(self, open_id: str) -> frozenset[str]:
        """The departments (open_department_id) a user is directly in: `GET /open-apis/contact/v3/users/:id`.

        Needs a contact scope and the field scope `contact:user.department:readonly`, and the user
        inside the app's contact range; otherwise Feishu refuses (FeishuApiError).
        """
        request = (
            self._contact.GetUserRequest.builder()
            .user_id(open_id)
            .user_id_type("open_id")
            .department_id_type("open_department_id")
            .build()
        )
        response = await self._call("user info", self._client.contact.v3.user.get, request)
        user = response.data.user if response.data is not None else None
        return frozenset(str(d) for d in (user.department_ids if user is not None else None) or [])

    async def chat_members(self, chat_id: str, *, max_pages: int = 100) -> frozenset[str]:
        """The open_ids of a group chat's human members (bots are never listed), every page.

        `GET /open-apis/im/v1/chats/:chat_id/members`; the bot must be in the chat. A chat larger
        than `max_pages` pages is refused rather than half-read.
        """
        members: set[str] = set()
        token: str | None = None
        for _ in range(max_pages):
            builder = self._im.GetChatMembersRequest.builder().chat_id(chat_id).member_id_type("open_id").page_size(100)
            request = (builder.page_token(token) if token else builder).build()
            response = await self._call("chat members", self._client.im.v1.chat_members.get, request)
            data = response.data
            members.update(str(m.member_id) for m in (data.items if data is not None else None) or [] if m.member_id)
            token = data.page_token if data is not None and data.has_more else None
            if not token:
                return frozenset(members)
        raise FeishuApiError("chat members", None, f"more than {max_pages} pages of members")

    # ------------------------------------------------------------------ retry policy
    def _forget_token(self) -> None:
        sdk.forget_tenant_token(self.app_id)

    def _backoff(self, attempt: int, response: Any) -> float:
        headers = getattr(getattr(response, "raw", None), "headers", None) or {}
        reset = {k.lower(): v for k, v in headers.items()}.get("x-ogw-ratelimit-reset")
        try:
            delay = float(reset) if reset is not None else 0.25 * 2**attempt
        except ValueError:
            delay = 0.25 * 2**attempt
        return min(max(delay, 0.05), self.max_backoff)

    async def _call(self, what: str, method: Callable[[Any], Any], request: Any) -> Any:
        refreshed = False
        last: FeishuApiError | None = None
        for attempt in range(self.attempts):
            try:
                response = await asyncio.wait_for(asyncio.to_thread(method, request), self.timeout * 2 + 1)
            except Exception as exc:  # noqa: BLE001 - timeouts, connection errors, unparsable answers
                code = getattr(exc, "code", None)
                if type(exc).__name__ == "ObtainAccessTokenException" and isinstance(code, int) and code != RATE_LIMITED:
                    # Feishu refused to issue a tenant token: the app id/secret (or the app's state) is wrong.
                    raise CredentialsRejected("tenant token", code, str(getattr(exc, "msg", ""))) from None
                last = FeishuApiError(what, None, type(exc).__name__)
                log.warning("feishu %s: %s (attempt %d)", what, type(exc).__name__, attempt + 1)
                await asyncio.sleep(min(0.25 * 2**attempt, self.max_backoff))
                continue
            if response.success():
                return response
            code, status = response.code, getattr(response.raw, "status_code", None)
            last = FeishuApiError(what, code, str(response.msg or ""), response.get_log_id())
            if code in TOKEN_INVALID and not refreshed:
                log.info("feishu %s: tenant token rejected (%s); fetching a new one", what, code)
                self._forget_token()
                refreshed = True
                continue
            if status == 429 or code == RATE_LIMITED or (status or 0) >= 500:
                delay = self._backoff(attempt, response)
                log.warning("feishu %s: %s/%s, retrying in %.2fs", what, status, code, delay)
                await asyncio.sleep(delay)
                continue
            raise last
        assert last is not None
        raise last


def _key(key: str | None) -> str:
    """An idempotency key (Feishu keeps it one hour, max 50 characters)."""
    return (key or uuidlib.uuid4().hex)[:50]
