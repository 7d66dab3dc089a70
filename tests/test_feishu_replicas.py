"""Two replicas of the bot behind one Feishu app, sharing one database (SQLite file or PostgreSQL).

Feishu may deliver an event, its redeliveries and the card clicks to different replicas; the
database decides, so each message starts one run and each approval executes once.
"""

from __future__ import annotations

import asyncio

from tests.fakes.openai_server import calls, last_user_text, text
from tests.feishu_helpers import approval_id_of, at_bot, click, fake_feishu, feishu_bot, feishu_env
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]


async def two_replicas(feishu_bot, fake, db_url, **kwargs):
    env = feishu_env(fake)  # one Feishu app: same id, secret, keys
    return [await feishu_bot(env=env, database_url=db_url, **kwargs) for _ in range(2)]


async def delivered(replica, event, attempts: int = 30):
    """Send like Feishu does: a 5xx answer (the database was busy) means "deliver again"."""
    for _ in range(attempts):
        answer = await replica.send(event)
        if answer[0] < 500:
            return answer
    return answer


async def test_redeliveries_spread_over_replicas_start_one_run(feishu_bot, fake_feishu, model, db_url):
    model.responder = lambda body: text(f"answer to {last_user_text(body)}")
    a, b = await two_replicas(feishu_bot, fake_feishu, db_url)
    events = [at_bot(f"question {i}", message_id=f"om_r{i}", event_id=f"evt_r{i}") for i in range(20)]
    sends = [delivered(replica, event) for event in events for replica in (a, b, a, b)]
    assert await asyncio.gather(*sends) == [(200, {})] * len(sends)
    await asyncio.gather(a.settle(), b.settle())
    await asyncio.gather(a.settle(), b.settle())
    assert await a.count("run") == 20
    assert sorted(fake_feishu.texts()) == sorted(f"answer to question {i}" for i in range(20))


async def test_card_from_one_replica_clicked_on_the_other_executes_once(feishu_bot, fake_feishu, model, db_url):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "r", "text": "x"})), text("Stored."))
    a, b = await two_replicas(feishu_bot, fake_feishu, db_url, toolsets=[notes_toolset(ledger)])
    await a.send(at_bot("write a note", message_id="om_ask"))
    await a.settle()
    card = a.card()
    approval_id = approval_id_of(card)
    answers = await asyncio.gather(b.send(click(approval_id)), a.send(click(approval_id)), b.send(click(approval_id)))
    await asyncio.gather(a.settle(), b.settle())
    await asyncio.gather(a.settle(), b.settle())
    assert [e["approval_id"] for e in ledger.effects] == [approval_id]
    assert sorted(answer["toast"]["type"] for _, answer in answers) == ["success", "warning", "warning"]
    assert card.json["header"]["template"] == "green"  # patched to the outcome
    assert fake_feishu.texts() == [
        "Asked for approval of 1 action(s): see the card(s) below.",
        "Stored.",
    ]  # the pause line above the card, the answer below it


async def test_a_conversation_continues_on_whichever_replica_gets_the_next_message(feishu_bot, fake_feishu, model, db_url):
    model.script(text("Hello, Alice."), text("You said hi before."))
    a, b = await two_replicas(feishu_bot, fake_feishu, db_url)
    await a.send(at_bot("hi", message_id="om_root"))
    await a.settle()
    await b.send(at_bot("what did I say?", message_id="om_next", root_id="om_root"))
    await b.settle()
    history = [m["content"] for m in model.requests[-1]["messages"] if m["role"] != "system"]
    assert history == ["hi", "Hello, Alice.", "what did I say?"]
    assert [m.in_thread and m.reply_to for m in fake_feishu.sent() if m.msg_type == "text"] == ["om_root", "om_next"]
