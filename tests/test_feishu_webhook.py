"""`POST /feishu/events` on the running server: hostile requests get a 4xx and have no effect;
redeliveries never start a second run.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bot.core.errors import StorageError
from tests.fakes.openai_server import calls, last_user_text, text
from tests.feishu_helpers import ALICE as ALICE_ID
from tests.feishu_helpers import (
    BOB,
    ENCRYPT_KEY,
    TOKEN,
    approval_id_of,
    at_bot,
    click,
    dm,
    encrypt,
    fake_feishu,
    feishu_bot,
    sign,
    wire,
)
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]


async def assert_no_side_effects(bot, model, api_calls_before: int) -> None:
    await bot.settle()
    assert model.requests == []
    assert len(bot.fake.calls) == api_calls_before  # no reply, reaction or card
    assert await bot.count("inbox_event") == 0
    assert await bot.count("seen_key") == 0


def forged(payload):
    body, headers = wire(payload)
    headers["X-Lark-Signature"] = sign(headers["X-Lark-Request-Timestamp"], headers["X-Lark-Request-Nonce"], body, key="guess")
    return body, headers


def wrong_token(payload):
    payload["header"]["token"] = "guessed-token"
    return wire(payload)


def stale(payload):
    return wire(payload, timestamp=int(time.time()) - 301)


def bad_ciphertext(payload):
    body = json.dumps({"encrypt": encrypt(b"not json at all")}).encode()
    ts, nonce = str(int(time.time())), "n1"
    return body, {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce, "X-Lark-Signature": sign(ts, nonce, body)}


def garbage_ciphertext(payload):
    body = json.dumps({"encrypt": "%%%"}).encode()
    ts, nonce = str(int(time.time())), "n1"
    return body, {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce, "X-Lark-Signature": sign(ts, nonce, body)}


def malformed_json(payload):
    body = b'{"encrypt": '
    ts, nonce = str(int(time.time())), "n1"
    return body, {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce, "X-Lark-Signature": sign(ts, nonce, body)}


def plaintext(payload):
    return wire(payload, key=None)


def unsigned(payload):
    body, _headers = wire(payload)
    return body, {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("build", "status"),
    [
        (forged, 401),
        (wrong_token, 401),
        (stale, 401),
        (bad_ciphertext, 400),
        (garbage_ciphertext, 400),
        (malformed_json, 400),
        (plaintext, 401),
        (unsigned, 401),
    ],
)
@pytest.mark.parametrize("kind", ["message", "click"])
async def test_hostile_requests_get_4xx_and_change_nothing(feishu_bot, model, build, status, kind):
    bot = await feishu_bot()
    before = len(bot.fake.calls)
    payload = at_bot("create a lead") if kind == "message" else click("ap-anything")
    got, body = await bot.post(*build(payload))
    assert got == status, body
    assert "Traceback" not in json.dumps(body)
    await assert_no_side_effects(bot, model, before)
    assert await bot.count("audit_event", "kind = 'click_refused'") == 0


async def test_forged_click_cannot_decide_a_real_approval(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write a note"))
    await bot.settle()
    approval_id = approval_id_of(bot.card())
    status, _ = await bot.post(*forged(click(approval_id)))
    await bot.settle()
    assert status == 401 and ledger.effects == []
    assert await bot.count("approval", "status = 'pending'") == 1


async def test_url_verification_challenge_is_answered(feishu_bot):
    bot = await feishu_bot()
    challenge = {"challenge": "ch-42", "token": TOKEN, "type": "url_verification"}
    body = json.dumps({"encrypt": encrypt(json.dumps(challenge).encode())}).encode()
    assert await bot.post(body, {"Content-Type": "application/json"}) == (200, {"challenge": "ch-42"})
    challenge["token"] = "nope"
    body = json.dumps({"encrypt": encrypt(json.dumps(challenge).encode())}).encode()
    assert (await bot.post(body, {}))[0] == 401


async def test_token_only_mode(feishu_bot, model):
    model.script(text("hi"))
    bot = await feishu_bot(key=None)
    assert (await bot.send(dm("hello")))[0] == 200
    payload = dm("again")
    payload["header"]["token"] = "wrong"
    assert (await bot.send(payload))[0] == 401
    await bot.settle()
    assert len(model.requests) == 1


async def test_unsubscribed_event_types_are_acknowledged(feishu_bot, model):
    bot = await feishu_bot()
    payload = {
        "schema": "2.0",
        "header": {"event_id": "e1", "token": TOKEN, "event_type": "im.message.message_read_v1"},
        "event": {},
    }
    assert await bot.send(payload) == (200, {})


async def test_unreadable_but_authentic_event_is_a_400(feishu_bot, model):
    bot = await feishu_bot()
    payload = dm("x")
    payload["event"]["message"]["content"] = "{broken"
    assert (await bot.send(payload))[0] == 400


async def test_storage_failure_answers_503_so_feishu_redelivers(feishu_bot, model, monkeypatch):
    bot = await feishu_bot()

    async def broken(msg):
        raise StorageError("could not record the message: OperationalError")

    monkeypatch.setattr(bot.app.core, "accept_message", broken)
    assert (await bot.send(dm("hello")))[0] == 503


async def test_oversized_body_is_refused(feishu_bot, model):
    bot = await feishu_bot()
    status, _ = await bot.post(b"{" + b" " * (2 * 1024 * 1024) + b"}", {"Content-Type": "application/json"})
    assert status == 413


async def test_redelivery_storm_200_events_5_times_each_is_200_runs(feishu_bot, model, db_url):
    model.responder = lambda body: text(f"answer to {last_user_text(body)}")
    bot = await feishu_bot(database_url=db_url)
    events = [at_bot(f"question {i}", message_id=f"om_storm_{i}", event_id=f"evt_storm_{i}") for i in range(200)]
    deliveries = [e for e in events for _ in range(4)]
    for i, event in enumerate(events):  # the fifth delivery: same message, a new event id (re-subscription)
        again = json.loads(json.dumps(event))
        again["header"]["event_id"] = f"evt_storm_{i}_again"
        deliveries.append(again)
    gate = asyncio.Semaphore(40)

    async def deliver(payload):
        """Like Feishu: an answer of 5xx (the database was busy for a moment) is delivered again."""
        async with gate:
            for _ in range(30):
                status = (await bot.send(payload))[0]
                if status < 500:
                    return status
            return status

    statuses = await asyncio.gather(*(deliver(p) for p in deliveries))
    await bot.settle()
    assert statuses == [200] * 1000
    assert await bot.count("run") == 200
    assert len(model.requests) == 200
    # A reply whose first delivery met a busy moment is retried by the outbox a little later.
    await bot.fake.wait_for(lambda: len(bot.fake.texts()) >= 200, timeout=60)
    assert sorted(bot.fake.texts()) == sorted(f"answer to question {i}" for i in range(200))
    assert len(bot.fake.reactions) == 200
    assert ENCRYPT_KEY not in json.dumps([c.body for c in bot.fake.calls])


async def test_a_click_slower_than_feishu_waits_is_answered_honestly_and_still_lands(feishu_bot, model, tmp_path):
    """A click waited for its answer past Feishu's 3 s (here: a department lookup the contact API holds
    back) and Feishu showed the clicker an error, though the decision landed afterwards. Now a click still
    in hand at the budget is answered "still being handled", goes on, and the card shows the outcome."""
    from bot.feishu import still_working as still_working_answer

    ledger = Ledger()
    policy = tmp_path / "policy.toml"  # a department is named: each clicker's departments are looked up
    policy.write_text(
        '[[tools]]\nmatch = "write_note"\nrule = "approve"\napprovers = ["feishu:ou_alice", "feishu-dept:od-ops"]\n'
    )
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)], env={"CHATOPS_POLICY": str(policy)})
    bot.adapter.click_budget = 0.2  # the department lookup below is held back for its whole 1 s budget
    bot.fake.user_lookups = asyncio.Event()
    await bot.send(at_bot("write a note"))
    await bot.settle()
    card = bot.card()
    status, answer = await bot.send(click(approval_id_of(card), operator=BOB, card_message_id=card.message_id))
    assert (status, answer) == (200, still_working_answer()), answer
    await bot.settle()  # the lookup gives up: Bob is in no listed department, and is told so directly
    (refusal,) = [m for m in bot.fake.sent() if m.chat_id == BOB]
    assert "You cannot decide this request" in refusal.content and ledger.effects == []

    status, answer = await bot.send(click(approval_id_of(card), card_message_id=card.message_id))
    assert (status, answer) == (200, still_working_answer()), answer  # answered at the budget, not yet done
    assert ledger.effects == []
    await bot.settle()  # Alice is a listed approver: the click lands
    assert len(ledger.effects) == 1
    assert not [m for m in bot.fake.sent() if m.chat_id == ALICE_ID]  # a click that landed needs no message
    bot.fake.user_lookups.set()
