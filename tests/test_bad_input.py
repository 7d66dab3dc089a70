"""Bad input is a 4xx, never a 5xx: absurd timestamps, oversize or NUL-containing approval ids in
signed clicks, signed-but-malformed bodies, on `/slack/events` and `/feishu/events`, on SQLite and
PostgreSQL. Signed requests are audited; each refusal is one log line without a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.parse

import pytest

from tests.fakes.slack_api import TEAM_ID
from tests.feishu_helpers import click as feishu_click
from tests.feishu_helpers import encrypt, fake_feishu, feishu_bot, sign
from tests.slack_helpers import ALICE, CHANNEL, SIGNING_SECRET, fake_slack_fixture, signed, slack_bot_fixture

__all__ = ["fake_feishu", "fake_slack_fixture", "feishu_bot", "slack_bot_fixture"]

ABSURD_TIMESTAMPS = ["9" * 400, "9" * 5000, "0", "-5", "1e30", "١٢٣", " 12 ", str(2**64)]
BAD_IDS = ["ap-" + "x" * 60, "ap-\x00abc", "ap-" + "9" * 5000, "\x00", "ap-😀", ""]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


def _slack_click(approval_id: str) -> str:
    payload = {
        "type": "block_actions",
        "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": ALICE, "username": "alice", "name": "alice", "team_id": TEAM_ID},
        "api_app_id": "A0CHATOPS",
        "trigger_id": "trigger-1",
        "container": {"type": "message", "message_ts": "1.1", "channel_id": CHANNEL},
        "channel": {"id": CHANNEL, "name": "ops"},
        "message": {"ts": "1.1", "blocks": []},
        "actions": [{"type": "button", "action_id": "chatops_approve", "block_id": "b", "value": approval_id, "action_ts": "1"}],
    }
    return "payload=" + urllib.parse.quote(json.dumps(payload))


async def _post_slack(bot, body: str | bytes, headers: dict[str, str], content_type: str) -> tuple[int, str]:
    data = body.encode() if isinstance(body, str) else body
    async with bot.http.post(bot.events_url, data=data, headers={"Content-Type": content_type, **headers}) as response:
        return response.status, await response.text()


@pytest.mark.parametrize("timestamp", ABSURD_TIMESTAMPS)
async def test_slack_absurd_timestamps_are_401(slack_bot, model, timestamp, caplog):
    bot = await slack_bot()
    body = json.dumps({"type": "event_callback", "event": {"type": "app_mention", "text": "hi"}})
    status, _ = await _post_slack(bot, body, signed(body, timestamp=timestamp), "application/json")
    assert status == 401
    _no_tracebacks(caplog)


SLACK_MALFORMED = [
    ("{", "application/json"),
    ("[]", "application/json"),
    ("null", "application/json"),
    ('{"type": "event_callback", "event": "text"}', "application/json"),
    ('{"type": "event_callback", "event": {"type": "message", "channel": 5, "user": [], "text": {}}}', "application/json"),
    (
        '{"type": "event_callback", "event": {"type": "app_mention", "user": "U0ALICE", "text": "<@U0BOT> hi"}}',
        "application/json",
    ),
    (
        '{"type": "event_callback", "event": {"type": "message", "channel_type": "im", "channel": "D1", "ts": "1.2"}}',
        "application/json",
    ),
    ("payload=%7B", "application/x-www-form-urlencoded"),
    ("payload=%5B%5D", "application/x-www-form-urlencoded"),
    ("payload=" + urllib.parse.quote('{"type": "block_actions"}'), "application/x-www-form-urlencoded"),
    (
        "payload=" + urllib.parse.quote('{"type": "block_actions", "actions": "x", "user": 5}'),
        "application/x-www-form-urlencoded",
    ),
    ("no=payload", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize(("body", "content_type"), SLACK_MALFORMED)
async def test_slack_signed_but_malformed_bodies_are_4xx(slack_bot, model, body, content_type, caplog):
    bot = await slack_bot()
    raw = body.encode("utf-8", "surrogateescape")
    ts = str(int(time.time()))
    digest = hmac.new(SIGNING_SECRET.encode(), b"v0:" + ts.encode() + b":" + raw, hashlib.sha256).hexdigest()
    headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}
    status, text = await _post_slack(bot, raw, headers, content_type)
    await bot.settle()
    assert status == 400, text
    _no_tracebacks(caplog)
    assert model.requests == []
    assert await bot.count("audit_event", "kind = 'request_refused'") + await bot.count("audit_staged") == 1


async def test_slack_non_utf8_body_is_refused_by_the_signature_check(slack_bot, model, caplog):
    bot = await slack_bot()
    raw, ts = b"\xff{}", str(int(time.time()))
    digest = hmac.new(SIGNING_SECRET.encode(), b"v0:" + ts.encode() + b":" + raw, hashlib.sha256).hexdigest()
    headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}
    assert (await _post_slack(bot, raw, headers, "application/json"))[0] == 401  # slack_sdk verifies text only
    _no_tracebacks(caplog)


@pytest.mark.parametrize("approval_id", BAD_IDS)
async def test_slack_signed_click_with_a_bad_id_is_not_found_and_audited(slack_bot, model, db_url, approval_id, caplog):
    bot = await slack_bot(database_url=db_url)
    body = _slack_click(approval_id)
    status, _ = await _post_slack(bot, body, signed(body), "application/x-www-form-urlencoded")
    await bot.settle()
    assert status == 200
    _no_tracebacks(caplog)
    assert await bot.count("audit_event", "kind = 'click_refused'") + await bot.count("audit_staged") >= 1
    (told,) = bot.fake.calls_to("chat.postEphemeral")
    assert "I do not know approval" in json.dumps(told.params) and "\\u0000" not in json.dumps(told.params)


def _feishu_signed(plain: bytes) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"encrypt": encrypt(plain)}).encode()
    ts = str(int(time.time()))
    return body, {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": "n", "X-Lark-Signature": sign(ts, "n", body)}


FEISHU_MALFORMED = [
    b"[]",
    b"{",
    b'{"schema": "2.0", "header": "x"}',
    b'{"schema": "2.0", "header": {"token": "test-verification-token", "event_type": "im.message.receive_v1"}, '
    b'"event": {"sender": {"sender_type": "user", "sender_id": {"open_id": "ou_x"}}, "message": {"chat_type": "p2p", "chat_id": "oc_1", '
    b'"message_id": "om_1", "message_type": "text", "content": "{broken"}}}',
    b'{"schema": "2.0", "header": {"token": "test-verification-token", "event_type": "card.action.trigger"}, "event": {}}',
]


@pytest.mark.parametrize("plain", FEISHU_MALFORMED)
async def test_feishu_signed_but_malformed_bodies_are_4xx_and_audited(feishu_bot, model, plain, caplog):
    bot = await feishu_bot()
    status, answer = await bot.post(*_feishu_signed(plain))
    await bot.settle()
    assert 400 <= status < 500, answer
    _no_tracebacks(caplog)
    assert model.requests == []
    assert await bot.count("audit_event", "kind = 'request_refused'") + await bot.count("audit_staged") == 1


@pytest.mark.parametrize("approval_id", BAD_IDS)
async def test_feishu_signed_click_with_a_bad_id_is_not_found_and_audited(feishu_bot, model, db_url, approval_id, caplog):
    bot = await feishu_bot(database_url=db_url)
    payload = feishu_click(approval_id)
    status, answer = await bot.post(*_feishu_signed(json.dumps(payload).encode()))
    await bot.settle()
    assert status in (200, 400), answer  # Feishu's own limit: ids over 64 characters or empty are unreadable
    if status == 200:
        shown = json.dumps(answer, ensure_ascii=False)  # Feishu speaks Chinese unless told otherwise
        assert ("I do not know approval" in shown or "找不到审批" in shown) and "\\u0000" not in json.dumps(answer)
    _no_tracebacks(caplog)
    refused = "kind IN ('click_refused', 'request_refused')"
    assert await bot.count("audit_event", refused) + await bot.count("audit_staged") >= 1


@pytest.mark.parametrize("timestamp", ABSURD_TIMESTAMPS)
async def test_feishu_absurd_timestamps_are_401(feishu_bot, model, timestamp, caplog):
    bot = await feishu_bot()
    body, headers = _feishu_signed(b"{}")
    headers["X-Lark-Request-Timestamp"] = timestamp
    headers["X-Lark-Signature"] = sign(timestamp, "n", body)
    status, _ = await bot.post(body, headers)
    assert status == 401
    _no_tracebacks(caplog)
