"""Slack delivery guarantees over real HTTP: retries run once, a failed first delivery is processed on
its retry, bad signatures do nothing at all, and a 429 from Slack is waited out, not doubled."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time

import pytest
from slack_bolt.request.async_request import AsyncBoltRequest

from tests.fakes.openai_server import text
from tests.slack_helpers import (  # noqa: F401 - fixtures
    CHANNEL,
    SIGNING_SECRET,
    encode,
    fake_slack_fixture,
    mention,
    next_ts,
    signed,
    slack_bot_fixture,
)

STORM_EVENTS = 200
DELIVERIES = 4


async def test_a_retry_storm_runs_each_event_exactly_once(slack_bot, fake_slack, model):
    model.responder = lambda body: text("done")
    bot = await slack_bot()
    events = [mention(f"task {i}", ts=next_ts()) for i in range(STORM_EVENTS)]
    deliveries = [(event, retry) for event in events for retry in (None, 1, 2, 3)]
    random.Random(7).shuffle(deliveries)
    gate = asyncio.Semaphore(16)

    async def deliver(event: dict, retry: int | None) -> int:
        async with gate:
            return (await bot.send(event, retry_num=retry))[0]

    statuses = await asyncio.gather(*(deliver(e, r) for e, r in deliveries))
    assert statuses == [200] * (STORM_EVENTS * DELIVERIES)
    await bot.settle()
    assert await bot.count("inbox_event") == STORM_EVENTS
    assert await bot.count("run") == STORM_EVENTS
    assert len(model.requests) == STORM_EVENTS
    replies = bot.replies()
    assert len(replies) == STORM_EVENTS
    assert {r["thread_ts"] for r in replies} == {e["event"]["ts"] for e in events}


async def test_a_first_delivery_that_could_not_be_recorded_is_answered_503_and_its_retry_is_processed(
    slack_bot, fake_slack, model, caplog
):
    model.script(text("done"))
    bot = await slack_bot()
    database = bot.app.settings.database_url.removeprefix("sqlite:///")
    event = mention("do it", ts=next_ts())

    with sqlite3.connect(database) as db:  # the inbox's dedupe table vanishes: recording fails for real
        db.execute("ALTER TABLE seen_key RENAME TO seen_key_gone")
    caplog.set_level(logging.DEBUG)
    status, _ = await bot.send(event)
    assert status == 503  # not acknowledged: Slack will deliver it again
    await bot.settle()
    assert model.requests == []
    assert "do it" not in caplog.text  # the payload is never logged

    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE seen_key_gone RENAME TO seen_key")
    status, _ = await bot.send(event, retry_num=1)
    assert status == 200
    await bot.settle()
    assert await bot.count("inbox_event") == 1
    assert len(model.requests) == 1
    assert bot.replies()[-1]["text"] == "done"


def _bad_headers(body: str) -> dict[str, dict[str, str]]:
    now = int(time.time())
    good = signed(body)
    return {
        "missing": {},
        "no signature": {"X-Slack-Request-Timestamp": str(now)},
        "no timestamp": {"X-Slack-Signature": good["X-Slack-Signature"]},
        "forged": signed(body, secret="not-the-secret"),
        "stale": signed(body, timestamp=str(now - 330)),  # past the 5 minutes, with room for the clock to move on
        "from the future": signed(body, timestamp=str(now + 330)),
        "non-numeric timestamp": {**good, "X-Slack-Request-Timestamp": "abc"},
        "garbage signature": {**good, "X-Slack-Signature": "v0=zz"},
        "other body": signed(body + " "),
    }


@pytest.mark.parametrize("case", list(_bad_headers("{}")))
async def test_bad_signatures_get_401_and_have_no_effect(slack_bot, fake_slack, model, caplog, case):
    model.script(text("must not be called"))
    bot = await slack_bot()
    payload = mention("secret plans 7c1f", ts=next_ts())
    body, _ = encode(payload)
    calls_before = len(fake_slack.calls)
    caplog.set_level(logging.DEBUG)

    status, answer = await bot.send(payload, headers=_bad_headers(body)[case])
    assert status == 401
    assert json.loads(answer) == {"error": "invalid request"}
    await bot.settle()
    assert await bot.count("inbox_event") == 0
    assert await bot.count("seen_key") == 0
    assert model.requests == []
    assert fake_slack.calls[calls_before:] == []
    assert "secret plans" not in caplog.text


async def test_url_verification_needs_a_valid_signature(slack_bot):
    bot = await slack_bot()
    challenge = {"type": "url_verification", "token": "legacy", "challenge": "c-123"}
    status, body = await bot.send(challenge)
    assert status == 200 and "c-123" in body
    assert (await bot.send(challenge, headers=signed("{}", secret=SIGNING_SECRET + "x")))[0] == 401


async def test_a_429_on_post_message_is_waited_out_and_the_reply_posted_once(slack_bot, fake_slack, model):
    model.script(text("the answer"))
    bot = await slack_bot()
    fake_slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    root = next_ts()
    await bot.send(mention("question", ts=root))
    await bot.settle()
    limited, posted = fake_slack.calls_to("chat.postMessage", ok_only=False)
    assert (limited.status, posted.status) == (429, 200)
    assert posted.at - limited.at >= 1.0  # Retry-After was honoured
    assert [(r["text"], r["channel"], r["thread_ts"]) for r in bot.replies()] == [("the answer", CHANNEL, root)]


async def test_bolts_own_signature_check_behind_ours_also_refuses_without_logging_the_body(slack_bot, caplog):
    bot = await slack_bot()
    body = json.dumps(mention("secret plans 9e2"))
    caplog.set_level(logging.DEBUG)
    headers = {"content-type": "application/json", **signed(body, secret="not-the-secret")}
    response = await bot.adapter.bolt.async_dispatch(AsyncBoltRequest(body=body, headers=headers))
    assert response.status == 401
    assert "secret plans" not in caplog.text
    assert await bot.count("inbox_event") == 0


async def test_a_reply_slack_never_answers_is_sent_again_and_the_log_says_it_may_now_be_there_twice(
    slack_bot, fake_slack, model, caplog
):
    """chat.postMessage hung past the client's timeout: slack_sdk's connection-error handler sent it again
    at once and said nothing, so the thread showed the answer twice with no trace anywhere. Only a
    connection that could not be made is tried again there now; the outbox retries a timeout itself,
    with a warning that the first one may have been posted."""
    caplog.set_level(logging.WARNING, logger="chatops.outbox")
    model.script(text("ANSWER 1"))
    bot = await slack_bot()
    fake_slack.hang("chat.postMessage")
    await bot.send(mention("hi"))
    (posted,) = await fake_slack.wait_for("chat.postMessage", timeout=60)  # the outbox's own next attempt
    assert posted.params["text"] == "ANSWER 1"
    warned = [r.getMessage() for r in caplog.records if "may have been posted" in r.getMessage()]
    assert len(warned) == 1 and "retrying in" in warned[0], warned
