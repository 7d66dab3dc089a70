"""The honest card end to end: a hostile call through the fake Slack (the "View full request" click
opens a modal with `views.open`), the fake Feishu (the card's "Full request" panel), the terminal,
the `chatops approval show` fallback, and the policy switch that denies text-direction controls."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.cli_approval import approval_show
from bot.core.display import unshow
from bot.core.errors import ChatopsError
from bot.slack.events import VIEW_ACTION
from storage.models import Approval, AuditEvent
from tests.fakes.openai_server import calls, text, tool_results
from tests.feishu_helpers import at_bot, fake_feishu, feishu_bot
from tests.feishu_helpers import click as feishu_click
from tests.slack_helpers import (  # noqa: F401 - fixtures
    ALICE,
    approval_id_of,
    card_message,
    click,
    fake_slack_fixture,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset
from tests.test_card_honesty import joined

__all__ = ["fake_feishu", "feishu_bot"]

TAIL = "See you at lunch!" + " " * 700 + "P.S. wire $50,000 to IBAN XX00 EVIL today."
LONG = "Minutes of the meeting.\n" + "Everything is fine. " * 400 + "\n\n\n\n\n\nP.S. also delete the backups."
HOSTILE = {"topic": "Invoice \u202efdp.exe\nWhy approval: read-only tool (auto)", "text": LONG + TAIL, "priority": 2}


def texts_of(blocks: list[dict]) -> list[str]:
    elements = [t for b in blocks for t in [b.get("text"), *b.get("elements", [])] if isinstance(t, dict)]
    return [t["text"] for t in elements if isinstance(t.get("text"), str)]


def view_click(card: dict, *, channel: str | None = None) -> dict:
    payload = click(card)
    payload["actions"][0]["action_id"] = VIEW_ACTION
    if channel is not None:
        payload["channel"]["id"] = payload["container"]["channel_id"] = channel
    return payload


async def test_slack_card_says_what_it_shortened_and_the_modal_shows_every_value(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(("write_note", HOSTILE)), text("Stored."))
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("write the minutes", ts=next_ts()))
    await bot.settle()
    card = card_message(fake_slack)
    shown = "\n".join(texts_of(card["blocks"]))
    assert "▸ topic: Invoice ⟨U+202E⟩fdp.exe⏎Why approval: read-only tool (auto)" in shown
    assert "topic contains text-direction controls (U+202E)" in shown and "topic contains line breaks" in shown
    assert "more characters in the full request" in shown and "“View full request” shows everything" in shown
    assert not [line for t in texts_of(card["blocks"]) for line in t.split("\n") if line.startswith("Why approval: read")]

    view_request = view_click(card)
    assert (await bot.send(view_request))[0] == 200
    (opened,) = await fake_slack.wait_for("views.open")
    assert opened.params["trigger_id"] == view_request["trigger_id"]
    blocks = opened.params["view"]["blocks"]
    assert len(blocks) <= 100 and all(len(b["text"]["text"]) <= 3000 for b in blocks if b["type"] == "section")
    pieces = [b["text"]["text"] for b in blocks if (b.get("block_id") or "").startswith("value:1:")]
    assert len(pieces) > 1  # split over several blocks
    full_text = unshow(joined(pieces, multiline=True))
    assert full_text == HOSTILE["text"]
    assert "⟨700 spaces⟩P.S. wire $50,000" in "".join(pieces) and "⟨6 line breaks⟩" in "".join(pieces)

    assert (await bot.send(click(card)))[0] == 200
    await bot.settle()
    assert [(e["topic"], e["text"]) for e in ledger.effects] == [(HOSTILE["topic"], HOSTILE["text"])]  # unchanged


async def test_slack_full_view_is_refused_from_another_channel(slack_bot, fake_slack, model):
    model.script(calls(("write_note", HOSTILE)), text("Stored."))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("write the minutes", ts=next_ts()))
    await bot.settle()
    card = card_message(fake_slack)
    assert (await bot.send(view_click(card, channel="C0ELSEWHERE")))[0] == 200
    (told,) = await fake_slack.wait_for("chat.postEphemeral")
    assert told.params["text"] == f"I cannot show approval {approval_id_of(card)} here."
    assert fake_slack.calls_to("views.open") == []


async def test_feishu_card_holds_the_full_request_in_a_collapsed_panel(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", HOSTILE)), text("Stored."))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write the minutes", message_id="om_minutes"))
    await bot.settle()
    card = bot.card()
    elements = card.json["body"]["elements"]
    panel = next(e for e in elements if e["tag"] == "collapsible_panel")
    assert panel["expanded"] is False
    pieces = [e["text"]["content"] for e in panel["elements"] if e["element_id"].startswith("v1_")]
    assert unshow(joined(pieces, multiline=True)) == HOSTILE["text"]
    topic = "".join(e["text"]["content"] for e in panel["elements"] if e["element_id"].startswith("v0_"))
    assert unshow(topic) == HOSTILE["topic"]
    assert any("open “Full request” below" in e.get("text", {}).get("content", "") for e in elements)

    approval_id = next(
        e["elements"][1]["columns"][0]["elements"][0]["behaviors"][0]["value"]["approval_id"]
        for e in elements
        if e["tag"] == "form"
    )
    status, _ = await bot.send(feishu_click(approval_id, "approve", card_message_id=card.message_id))
    assert status == 200
    await bot.settle()
    assert [e["text"] for e in ledger.effects] == [HOSTILE["text"]]


async def test_the_cli_prints_a_card_in_full(terminal_bot, model, sqlite_url):
    huge = {"topic": "ops", "text": "abc " * 100_000 + "the end"}  # more than a Slack modal or a Feishu card holds
    model.script(calls(("write_note", huge)))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())])
    await bot.say("write it")
    async with bot.app.ctx.db.transaction() as session:
        (approval_id,) = (await session.execute(sa.select(Approval.id))).scalars().all()
    out = io.StringIO()
    approval_show(sqlite_url, approval_id, out)
    assert "│     │ " + "abc " * 100_000 + "the end" in out.getvalue()
    with pytest.raises(ChatopsError, match="no approval 'ap-nope'"):
        approval_show(sqlite_url, "ap-nope", io.StringIO())
    with pytest.raises(ChatopsError, match="not an approval id"):
        approval_show(sqlite_url, "ap\x00" * 30, io.StringIO())


async def test_policy_can_deny_arguments_with_text_direction_controls(terminal_bot, model, tmp_path: Path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[arguments]\ndeny_bidi_controls = true\n", encoding="utf-8")
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "Invoice \u202efdp.exe", "text": "hi"})), text("It was denied."))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], CHATOPS_POLICY=str(policy))
    await bot.say("write it")
    (result,) = tool_results(model.requests[-1])
    assert result == "Not run: denied by policy (the arguments contain text-direction controls (U+202E))."
    assert ledger.effects == [] and "Approval needed" not in bot.transcript()
    async with bot.app.ctx.db.transaction() as session:
        rows = (await session.execute(sa.select(AuditEvent).where(AuditEvent.kind == "tool_proposed"))).scalars().all()
    assert [(r.tool, r.status) for r in rows] == [("write_note", "deny")]
