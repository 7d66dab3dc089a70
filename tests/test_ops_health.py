"""Operators' endpoints on real bots: `/healthz`, `/readyz` transitions on the fakes, `/metrics`."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_server import text
from tests.fakes.tcp_proxy import TcpProxy
from tests.feishu_helpers import fake_feishu, feishu_bot
from tests.slack_helpers import fake_slack_fixture, mention, slack_bot_fixture

__all__ = ["fake_feishu", "fake_slack_fixture", "feishu_bot", "slack_bot_fixture"]


async def get(app: Any, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{app.port}{path}") as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


async def ready_becomes(app: Any, status: int, timeout: float = 15.0) -> dict[str, Any]:
    """Poll /readyz until it answers `status` (the transition is driven from outside)."""
    async with asyncio.timeout(timeout):
        while True:
            code, body = await get(app, "/readyz")
            if code == status:
                return body
            await asyncio.sleep(0.1)


def samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, parsed with prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_healthz_readyz_and_metrics_answer_on_a_bot_without_channels(bots, model):
    model.script(text("hello"))
    app = await bots.run(await bots.start(serve_http=True))
    assert await get(app, "/healthz") == (200, {"ok": True, "replica": app.ctx.replica_id})
    assert (await get(app, "/readyz"))[0] == 200
    before = samples((await get(app, "/metrics"))[1])
    await app.ctx.model.complete([{"role": "user", "content": "hi"}], [])
    after = samples((await get(app, "/metrics"))[1])
    assert after[("chatops_model_seconds_count", ())] == before.get(("chatops_model_seconds_count", ()), 0) + 1
    names = {name for name, _ in after}
    for expected in ("chatops_model_tokens_total", "chatops_model_seconds_bucket"):
        assert expected in names


async def test_metrics_count_slack_acks_by_status(slack_bot, fake_slack, model):
    model.script(text("ok"))
    bot = await slack_bot()
    key = ("chatops_acks_total", (("platform", "slack"), ("status", "refused")))
    before = samples((await get(bot.app, "/metrics"))[1]).get(key, 0)
    assert (await bot.send(mention("hi"), headers={"X-Slack-Signature": "v0=bad", "X-Slack-Request-Timestamp": "1"}))[0] == 401
    page = samples((await get(bot.app, "/metrics"))[1])
    assert page[key] == before + 1
    assert page[("chatops_ack_seconds_count", (("platform", "slack"),))] >= 1


@pytest.fixture
async def proxied_postgres(postgres_url: str) -> Any:
    """The test PostgreSQL behind a TCP proxy the test can cut."""
    url = sa.make_url(postgres_url)
    async with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy, postgres_url.replace(f"{url.host}:{url.port or 5432}", f"127.0.0.1:{proxy.port}", 1)


async def test_readyz_follows_the_database_down_and_back(bots, proxied_postgres):
    proxy, url = proxied_postgres
    app = await bots.run(await bots.start(serve_http=True, database_url=url))
    await ready_becomes(app, 200)
    proxy.cut()
    body = await ready_becomes(app, 503)
    assert set(body["problems"]) == {"database"}
    assert (await get(app, "/healthz"))[0] == 200  # alive: the database is not its business
    proxy.restore()
    await ready_becomes(app, 200)


async def test_readyz_names_a_slack_token_that_slack_rejects(slack_bot, fake_slack, model):
    bot = await slack_bot()
    await ready_becomes(bot.app, 200)
    bot.adapter.auth_recheck = 0  # ask auth.test on every /readyz
    fake_slack.fail("auth.test", "invalid_auth", times=1)
    body = await ready_becomes(bot.app, 503)
    assert "SLACK_BOT_TOKEN" in body["problems"]["slack"] and "invalid_auth" in body["problems"]["slack"]
    await ready_becomes(bot.app, 200)


async def test_socket_mode_that_cannot_connect_starts_but_is_not_ready(slack_bot, fake_slack, model):
    fake_slack.fail("apps.connections.open", "internal_error", times=2)
    bot = await slack_bot(socket=True)  # start-up is not blocked by the failing connection
    body = await ready_becomes(bot.app, 503)
    assert "Socket Mode" in body["problems"]["slack"]
    await fake_slack.wait_connected(timeout=20)  # the background loop retries with backoff
    await ready_becomes(bot.app, 200)


async def test_readyz_names_a_feishu_secret_that_feishu_refuses(feishu_bot, fake_feishu):
    bot = await feishu_bot()
    await ready_becomes(bot.app, 200)
    bot.adapter.token_recheck = 0
    fake_feishu.app_secret = "the-rotated-secret"  # the app secret was changed in the console
    fake_feishu.fail_token_once()  # and the cached tenant token expires
    body = await ready_becomes(bot.app, 503)
    assert "FEISHU_APP_SECRET" in body["problems"]["feishu"]


async def test_readyz_says_when_the_feishu_long_connection_is_down(feishu_bot, fake_feishu):
    bot = await feishu_bot(mode="ws", key=None, token=None)
    await ready_becomes(bot.app, 200)
    assert fake_feishu._ws is not None
    await fake_feishu._ws.close()  # Feishu drops the connection (the fake allows no reconnect)
    body = await ready_becomes(bot.app, 503)
    assert "long connection" in body["problems"]["feishu"]


async def test_readyz_is_503_while_stopping(bots):
    app = await bots.run(await bots.start(serve_http=True))
    readiness = app.readiness()
    app.stopping = True
    assert await readiness.problems() == {"process": "stopping"}


@pytest.mark.skipif(os.environ.get("PROMETHEUS_MULTIPROC_DIR") is not None, reason="the suite runs single-process metrics")
def test_metric_names_are_the_documented_ones():
    from bot.core import metrics

    names = {
        "ACKS": ["platform", "status"],
        "ACK_SECONDS": ["platform"],
        "RUNS": ["outcome"],
        "APPROVALS": ["state"],
        "MODEL_SECONDS": [],
        "MODEL_TOKENS": ["kind"],
        "TOOL_SECONDS": ["tool"],
        "TOOL_OUTCOMES": ["tool", "outcome"],
        "OUTBOX_RETRIES": ["platform"],
        "QUEUE_DEPTH": ["kind"],
        "LEASE_TAKEOVERS": ["kind"],
    }
    for attr, labels in names.items():
        assert list(getattr(metrics, attr)._labelnames) == labels, attr
