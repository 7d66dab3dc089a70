"""Feishu test helpers: event payloads, Feishu's own encryption and signing, and a running bot.

`encrypt` and `sign` do exactly what Feishu does before POSTing to a request URL: AES-256-CBC
with key sha256(encrypt_key), a random IV prepended, PKCS#7 padding, base64; and the signature
sha256(timestamp + nonce + encrypt_key + body) in `X-Lark-Signature`. `FeishuBot` is a bot built
as `chatops serve` builds it (the conftest `bots` factory) with the real `FeishuAdapter`, its
lark-oapi client pointed at `FakeFeishu`, and `send()` POSTing to the real `/feishu/events`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from Crypto.Cipher import AES

from bot.app import App
from bot.feishu import FeishuAdapter
from tests.fakes.feishu_api import BOT_OPEN_ID, FakeFeishu, Message

ENCRYPT_KEY = "test-encrypt-key-0123456789"
TOKEN = "test-verification-token"
TENANT = "tenant-1"
ALICE, BOB, CAROL = "ou_alice", "ou_bob", "ou_carol"
GROUP, DM = "oc_group", "oc_dm_alice"

_ids = itertools.count(1)


# ---------------------------------------------------------------------- Feishu's crypto
def encrypt(plaintext: bytes, key: str = ENCRYPT_KEY) -> str:
    iv = os.urandom(16)
    pad = 16 - len(plaintext) % 16
    cipher = AES.new(hashlib.sha256(key.encode()).digest(), AES.MODE_CBC, iv)
    return base64.b64encode(iv + cipher.encrypt(plaintext + bytes([pad]) * pad)).decode()


def sign(timestamp: str, nonce: str, body: bytes, key: str = ENCRYPT_KEY) -> str:
    return hashlib.sha256((timestamp + nonce + key).encode() + body).hexdigest()


def wire(payload: dict[str, Any], *, key: str | None = ENCRYPT_KEY, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) as Feishu sends `payload`: encrypted and signed when a key is set."""
    plain = json.dumps(payload, ensure_ascii=False).encode()
    ts, nonce = str(timestamp if timestamp is not None else int(time.time())), uuid.uuid4().hex
    if key is None:
        return plain, {"Content-Type": "application/json", "X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce}
    body = json.dumps({"encrypt": encrypt(plain, key)}).encode()
    headers = {"Content-Type": "application/json", "X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce}
    headers["X-Lark-Signature"] = sign(ts, nonce, body, key)
    return body, headers


# ---------------------------------------------------------------------- payloads
def envelope(event_type: str, event: dict[str, Any], *, event_id: str | None = None, token: str = TOKEN) -> dict[str, Any]:
    header = {
        "event_id": event_id or f"evt-{next(_ids)}",
        "token": token,
        "create_time": str(int(time.time() * 1000)),
        "event_type": event_type,
        "tenant_key": TENANT,
        "app_id": "cli_test",
    }
    return {"schema": "2.0", "header": header, "event": event}


def message(
    text: str,
    *,
    chat_type: str = "group",
    chat_id: str = GROUP,
    sender: str = ALICE,
    mentions: list[tuple[str, str]] = (),
    message_id: str | None = None,
    root_id: str | None = None,  # type: ignore[assignment]
    event_id: str | None = None,
    sender_type: str = "user",
    msg_type: str = "text",
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`im.message.receive_v1`; `mentions` are (open_id, name) for `@_user_1`, `@_user_2`... in `text`."""
    msg = {
        "message_id": message_id or f"om_{next(_ids)}",
        "create_time": str(int(time.time() * 1000)),
        "chat_id": chat_id,
        "chat_type": chat_type,
        "message_type": msg_type,
        "content": json.dumps(content if content is not None else {"text": text}, ensure_ascii=False),
        "mentions": [
            {"key": f"@_user_{i}", "id": {"open_id": oid, "union_id": "on_x", "user_id": ""}, "name": name, "tenant_key": TENANT}
            for i, (oid, name) in enumerate(mentions, 1)
        ],
    }
    if root_id:
        msg.update(root_id=root_id, parent_id=root_id, thread_id=f"omt_{root_id}")
    sender_obj = {
        "sender_id": {"open_id": sender, "union_id": "on_" + sender, "user_id": ""},
        "sender_type": sender_type,
        "tenant_key": TENANT,
    }
    return envelope("im.message.receive_v1", {"sender": sender_obj, "message": msg}, event_id=event_id)


def at_bot(text: str, **kwargs: Any) -> dict[str, Any]:
    """A group message that @mentions the bot first."""
    return message(f"@_user_1 {text}", mentions=[(BOT_OPEN_ID, "chatops")], **kwargs)


def dm(text: str, **kwargs: Any) -> dict[str, Any]:
    return message(text, chat_type="p2p", chat_id=DM, **kwargs)


def click(
    approval_id: str,
    action: str = "approve",
    *,
    operator: str = ALICE,
    reason: str | None = None,
    card_message_id: str = "om_card",
) -> dict[str, Any]:
    """`card.action.trigger` for a click on the card's Approve or Reject submit button."""
    act: dict[str, Any] = {"value": {"action": action, "approval_id": approval_id}, "tag": "button", "name": action}
    act["form_value"] = {"reject_reason": reason} if reason is not None else {}
    event = {
        "operator": {"tenant_key": TENANT, "open_id": operator, "union_id": "on_" + operator, "user_id": ""},
        "token": f"c-{next(_ids)}",
        "action": act,
        "host": "im_message",
        "context": {"open_message_id": card_message_id, "open_chat_id": GROUP},
    }
    return envelope("card.action.trigger", event)


def approval_id_of(card: Message) -> str:
    for element in card.json["body"]["elements"]:
        if element.get("tag") == "form":
            button = element["elements"][1]["columns"][0]["elements"][0]
            return str(button["behaviors"][0]["value"]["approval_id"])
    raise AssertionError("the card has no decision form")


def card_text(card: Message) -> str:
    return json.dumps(card.json, ensure_ascii=False)


# ---------------------------------------------------------------------- a running bot
def feishu_env(
    fake: FakeFeishu, *, mode: str = "webhook", key: str | None = ENCRYPT_KEY, token: str | None = TOKEN
) -> dict[str, str]:
    env = {
        "FEISHU_APP_ID": f"cli_{uuid.uuid4().hex[:12]}",
        "FEISHU_APP_SECRET": "test-app-secret",
        "FEISHU_DOMAIN": fake.url,
        "FEISHU_MODE": mode,
    }
    env.update({"FEISHU_ENCRYPT_KEY": key} if key else {})
    env.update({"FEISHU_VERIFICATION_TOKEN": token} if token else {})
    return env


@dataclass
class FeishuBot:
    """A started bot with the Feishu adapter, its fake Feishu, and an HTTP client for `/feishu/events`."""

    app: App
    adapter: FeishuAdapter
    fake: FakeFeishu
    http: aiohttp.ClientSession
    key: str | None = ENCRYPT_KEY

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}/feishu/events"

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        async with self.http.post(self.events_url, data=body, headers=headers) as response:
            text = await response.text()
            return response.status, json.loads(text) if text.startswith("{") else text

    async def send(self, payload: dict[str, Any], **kwargs: Any) -> tuple[int, Any]:
        """POST `payload` the way Feishu does (encrypted and signed with the bot's key)."""
        kwargs.setdefault("key", self.key)
        msg = payload.get("event", {}).get("message")
        if msg:
            self.fake.user_message(msg["message_id"], msg["chat_id"], msg.get("root_id"))
        body, headers = wire(payload, **kwargs)
        return await self.post(body, headers)

    async def settle(self) -> None:
        await self.app.ctx.tasks.idle()

    async def count(self, table: str, where: str = "1=1") -> int:
        async with self.app.ctx.db.transaction() as session:
            return int((await session.execute(sa.text(f"SELECT COUNT(*) FROM {table} WHERE {where}"))).scalar_one())

    def card(self) -> Message:
        cards = self.fake.cards()
        assert cards, "no approval card was posted"
        return cards[-1]


async def start_feishu_bot(
    bots: Any, fake: FakeFeishu, *, mode: str = "webhook", key: str | None = ENCRYPT_KEY, token: str | None = TOKEN, **kwargs: Any
) -> FeishuBot:
    env = {**feishu_env(fake, mode=mode, key=key, token=token), **kwargs.pop("env", {})}
    app = await bots.start(serve_http=True, **kwargs, **env)
    adapter = FeishuAdapter(app.core, app.settings)
    app.add_adapter(adapter)
    await bots.run(app)
    return FeishuBot(app, adapter, fake, aiohttp.ClientSession(), key)


# ---------------------------------------------------------------------- fixtures (import them into a test module)
@pytest.fixture
async def fake_feishu() -> AsyncIterator[FakeFeishu]:
    fake = await FakeFeishu().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def feishu_bot(bots: Any, fake_feishu: FakeFeishu) -> AsyncIterator[Callable[..., Awaitable[FeishuBot]]]:
    """`await feishu_bot(toolsets=[...], mode="webhook", key=..., token=..., env={...})` -> a started `FeishuBot`."""
    started: list[FeishuBot] = []

    async def start(**kwargs: Any) -> FeishuBot:
        bot = await start_feishu_bot(bots, fake_feishu, **kwargs)
        started.append(bot)
        return bot

    yield start
    await bots.stop_all()  # before the fake Feishu goes away (fixtures tear down in reverse order)
    for bot in started:
        await bot.http.close()
