"""`FeishuApi` (the real lark-oapi client) against the fake Feishu Open API.

lark-oapi keeps tenant tokens in a process-global cache keyed by app id, so every test uses
its own app id.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from bot.feishu.client import FeishuApi, FeishuApiError
from tests.fakes.feishu_api import BOT_OPEN_ID, FakeFeishu

TEXT = json.dumps({"text": "hello"})


@pytest.fixture
async def fake():
    server = await FakeFeishu().start()
    yield server
    await server.stop()


@pytest.fixture
async def api(fake):
    client = FeishuApi(app_id=f"cli_{uuid.uuid4().hex[:10]}", app_secret="secret", domain=fake.url, timeout=2.0)
    await client.open()
    return client


async def test_calls_reach_the_fake_through_the_domain_setting(api, fake):
    assert await api.bot_open_id() == BOT_OPEN_ID
    chat_message = await api.send("oc_1", "text", TEXT)
    reply = await api.reply(chat_message, "text", TEXT, in_thread=True)
    await api.react(reply, "OnIt")
    card = await api.send("oc_1", "interactive", json.dumps({"schema": "2.0", "body": {"elements": []}}))
    await api.patch(card, json.dumps({"schema": "2.0", "body": {"elements": [{"tag": "hr"}]}}))
    assert [c.path for c in fake.calls][:2] == ["/open-apis/auth/v3/tenant_access_token/internal", "/open-apis/bot/v3/info"]
    assert len(fake.calls_to("token")) == 1  # cached
    assert all(c.token == "t-1" for c in fake.calls if c.path != fake.calls[0].path)
    assert fake.messages[reply].reply_to == chat_message and fake.messages[reply].in_thread
    assert fake.calls_to("create")[0].query == {"receive_id_type": "chat_id"}
    assert fake.reactions == [(reply, "OnIt")]
    assert fake.messages[card].json["body"]["elements"] == [{"tag": "hr"}]


async def test_invalid_token_is_refreshed_and_the_call_retried_once(api, fake):
    await api.send("oc_1", "text", TEXT)
    fake.fail_token_once()
    await api.send("oc_1", "text", TEXT)
    assert [c.token for c in fake.calls_to("create")] == ["t-1", "t-1", "t-2"]
    assert len(fake.calls_to("token")) == 2
    assert len(fake.messages) == 2


async def test_a_token_that_stays_invalid_is_an_error_not_a_loop(api, fake):
    await api.bot_open_id()
    fake.fail_token_once()
    fake.fail_token_once()
    with pytest.raises(FeishuApiError) as info:
        await api.send("oc_1", "text", TEXT)
    assert info.value.code == 99991663
    assert len(fake.calls_to("create")) == 2


async def test_rate_limit_is_retried_with_backoff(api, fake):
    fake.rate_limit_once()
    fake.rate_limit_once()
    message_id = await api.send("oc_1", "text", TEXT, key="k-1")
    assert len(fake.calls_to("create")) == 3 and list(fake.messages) == [message_id]


async def test_rate_limit_retries_are_bounded(api, fake):
    for _ in range(api.attempts):
        fake.rate_limit_once()
    with pytest.raises(FeishuApiError) as info:
        await api.send("oc_1", "text", TEXT)
    assert info.value.code == 99991400
    assert len(fake.calls_to("create")) == api.attempts and fake.messages == {}


async def test_timeouts_are_bounded_and_a_retried_send_posts_once(api, fake):
    await api.bot_open_id()
    fake.stall_once(api.timeout + 1)
    started = time.monotonic()
    message_id = await api.send("oc_1", "text", TEXT, key="same-key")
    assert time.monotonic() - started < api.timeout * 2 + 2
    assert len(fake.calls_to("create")) == 2  # timed out once, retried with the same uuid
    assert list(fake.messages) == [message_id]


async def test_other_errors_are_raised_with_code_and_log_id(api, fake):
    with pytest.raises(FeishuApiError) as info:
        await api.patch("om_missing", json.dumps({"schema": "2.0"}))
    assert info.value.code == 230001
    assert len(fake.calls_to("patch")) == 1  # not retried


async def test_unreachable_feishu_fails_after_bounded_attempts():
    client = FeishuApi(
        app_id=f"cli_{uuid.uuid4().hex[:10]}", app_secret="s", domain="http://127.0.0.1:9", timeout=0.5, attempts=2
    )
    await client.open()
    with pytest.raises(FeishuApiError) as info:
        await client.bot_open_id()
    assert info.value.code is None


def test_domain_must_be_https_except_loopback():
    client = FeishuApi(app_id="cli_x", app_secret="s", domain="http://open.example.com")
    with pytest.raises(ValueError):
        client._build()
