"""Findings of an outside check of the Feishu side: each test drives the real bot over real HTTP
(`/feishu/events`, encrypted and signed as Feishu does) against the fake Feishu, and fails on the
code it was written against because of the finding it names."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict

from bot.core.cards import card_content, card_view
from bot.feishu import cards as feishu_cards
from storage.models import Approval
from tests.fakes.feishu_api import ELEMENT_LIMIT, element_count
from tests.fakes.openai_server import calls, text
from tests.feishu_helpers import (
    ALICE,
    BOB,
    DM,
    GROUP,
    approval_id_of,
    at_bot,
    card_text,
    click,
    dm,
    fake_feishu,
    feishu_bot,
)
from tests.support_tools import Ledger, notes_toolset
from tools.registry import Toolset, ToolSpec

__all__ = ["fake_feishu", "feishu_bot"]  # fixtures used by this module


class AnyArguments(BaseModel):
    """Arguments as an MCP tool whose schema does not close its properties takes them: any keys."""

    model_config = ConfigDict(extra="allow")


def wide_toolset(ledger: Ledger) -> Toolset:
    """`configure`: a write tool taking any keys (like such an MCP tool), recording what it ran with."""
    toolset = Toolset("test-wide")

    async def run(ctx: Any, args: dict[str, Any]) -> str:
        ledger.effects.append({"args": dict(args), "approval_id": ctx.approval_id})
        return "configured"

    schema = {"type": "object", "properties": {}}
    spec = ToolSpec(
        name="configure", description="Set configuration keys.", read_only=False, args_model=AnyArguments, run=run,
        source="test-wide", parameters_schema=schema,
    )  # fmt: skip
    toolset.specs.append(spec)
    return toolset


def messages_in(bot, chat_id: str) -> list[str]:
    return [m.content for m in bot.fake.sent() if m.chat_id == chat_id]


# ---------------------------------------------------------------------- `pending` in a group
async def test_pending_typed_in_a_group_does_not_post_another_chats_request_there(feishu_bot, model):
    """Alice's request in a direct chat, with its frozen arguments, must not be shown to a whole group
    because she typed `pending` there (Slack answers `pending` privately)."""
    model.script(calls(("write_note", {"topic": "salaries", "text": "CEO 900k, CFO 700k"})), text("ok"))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(dm("note the salaries", message_id="om_dm_ask"))
    await bot.settle()
    assert "900k" in card_text(bot.card()) and bot.card().chat_id == DM
    assert (await bot.send(at_bot("pending", message_id="om_group_pending")))[0] == 200
    await bot.settle()
    leaked = [m for m in messages_in(bot, GROUP) if "900k" in m]
    assert leaked == [], f"{len(leaked)} message(s) in the group show the DM request's arguments"


async def test_a_card_reposted_by_pending_does_not_stay_pending_after_the_decision(feishu_bot, model):
    """`pending` re-posts the card with live buttons; once the request is approved on the original card
    and has run, the copy must not go on saying it waits for a decision (the card never lies)."""
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write a note", message_id="om_ask"))
    await bot.settle()
    original = bot.card()
    approval_id = approval_id_of(original)
    await bot.send(at_bot("pending", message_id="om_pending", root_id="om_ask"))
    await bot.settle()
    copies = [c for c in bot.fake.cards() if c.message_id != original.message_id]
    assert len(copies) == 1  # the re-posted card
    await bot.send(click(approval_id, card_message_id=original.message_id))
    await bot.settle()
    assert len(ledger.effects) == 1
    copy = bot.fake.messages[copies[0].message_id].json
    assert not any(e.get("tag") == "form" for e in copy["body"]["elements"]), "the copy still offers Approve/Reject"
    assert copy["header"]["template"] != "orange", "the copy still shows the request as pending"


async def test_the_pending_answer_cannot_mention_everyone(feishu_bot, model):
    """An argument shown in the `pending` list is text: `<at user_id="all">` in it must not @all the group."""
    topic = '<at user_id="all"></at> urgent'
    model.script(calls(("write_note", {"topic": topic, "text": "y"})), text("ok"))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(at_bot("write a note", message_id="om_ask"))
    await bot.settle()
    await bot.send(at_bot("pending", message_id="om_pending"))
    await bot.settle()
    answers = [m.json["text"] for m in bot.fake.sent() if m.msg_type == "text" and "urgent" in m.json["text"]]
    assert answers, "the pending list names the request"
    assert not any("<at " in a for a in answers), answers


# ---------------------------------------------------------------------- many or long arguments
async def wait_for_card_or_notice(bot) -> None:
    """Until the card is posted, or the notice that it could not be (it names the tool)."""
    await bot.fake.wait_for(lambda: bool(bot.fake.cards()) or any("configure" in t for t in bot.fake.texts()), timeout=60)
    await bot.settle()


async def test_a_call_with_forty_arguments_gets_a_card_feishu_accepts(feishu_bot, model):
    """Feishu refuses a card 2.0 of more than 200 elements; every div is two (the div and its
    plain_text), and the card lists each argument twice (compact and in the panel). Slack's card
    packs any number of arguments into its 50 blocks."""
    ledger = Ledger()
    args = {f"key_{i:02d}": f"value {i}" for i in range(40)}
    model.script(calls(("configure", args)), text("done"))
    bot = await feishu_bot(toolsets=[wide_toolset(ledger)], env={"CHATOPS_OUTBOX_DEADLINE": "5"})
    await bot.send(at_bot("configure it", message_id="om_ask"))
    await wait_for_card_or_notice(bot)
    assert bot.fake.cards(), f"no card was posted; the chat was told: {bot.fake.texts()}"
    card = bot.card()
    assert element_count(card.json) <= ELEMENT_LIMIT
    shown = card_text(card)
    assert all(f"{k}: {v}" in shown for k, v in args.items())
    await bot.send(click(approval_id_of(card), card_message_id=card.message_id))
    await bot.settle()
    assert [e["args"] for e in ledger.effects] == [args]


async def test_a_call_with_three_hundred_arguments_gets_a_card_at_once(feishu_bot, model):
    """render_card raises 'cannot be made small enough' (said to be unreachable): the card job is
    retried until the outbox deadline (10 minutes by default), then cancelled."""
    args = {f"k{i:03d}": "v" for i in range(300)}
    model.script(calls(("configure", args)), text("done"))
    bot = await feishu_bot(toolsets=[wide_toolset(Ledger())], env={"CHATOPS_OUTBOX_DEADLINE": "5"})
    await bot.send(at_bot("configure it", message_id="om_ask"))
    await wait_for_card_or_notice(bot)
    assert bot.fake.cards(), f"no card was posted; the chat was told: {bot.fake.texts()}"
    assert await bot.count("audit_event", "kind = 'delivery_failed'") == 0


async def test_an_argument_with_a_very_long_name_gets_a_card(feishu_bot, model):
    """A 30,000-character key (names are never shortened on the Feishu card): same 'cannot be made
    small enough' and a card that never comes. Slack clips the name and says so."""
    args = {"k" * 30_000: "v"}
    model.script(calls(("configure", args)), text("done"))
    bot = await feishu_bot(toolsets=[wide_toolset(Ledger())], env={"CHATOPS_OUTBOX_DEADLINE": "5"})
    await bot.send(at_bot("configure it", message_id="om_ask"))
    await wait_for_card_or_notice(bot)
    assert bot.fake.cards(), f"no card was posted; the chat was told: {bot.fake.texts()}"


# ---------------------------------------------------------------------- blank space
NOW = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)


def rendered(args: dict[str, Any]) -> dict[str, Any]:
    row = Approval(
        id="ap-blank1", run_id="run-1", tool_call_id="call-1", tool_name="write_note", args=args, args_sha256="-",
        platform="feishu", requester_id="ou_alice", requester={"id": "ou_alice"}, thread={},
        card=card_content("Write a note", args, [], [], "confirm"), status="pending", votes=[],
        expires_at=NOW + timedelta(hours=1),
    )  # fmt: skip
    return feishu_cards.render_card(card_view(row))


def test_three_hundred_arguments_each_with_an_invisible_character_still_get_a_card():
    """A warning line per argument: 90 of them made the Feishu card impossible to render ("cannot be
    made small enough"; the request waited 10 minutes, then was cancelled) and 3,000 a Slack card of
    72 blocks, which Slack refuses. The warnings are counted past a dozen; each value keeps its markers."""
    from bot.slack.blocks import card_blocks

    args = {f"k{i}": f"v\u200b{i}" for i in range(300)}
    card = rendered(args)
    assert element_count(card) <= ELEMENT_LIMIT
    shown = json.dumps(card, ensure_ascii=False)
    assert "k0 contains invisible characters" in shown and "289 more warning(s)" in shown
    row = Approval(
        id="ap-many1", run_id="run-1", tool_call_id="call-1", tool_name="configure", args=args, args_sha256="-",
        platform="slack", requester_id="U0ALICE", requester={"id": "U0ALICE"}, thread={},
        card=card_content("Configure", args, [], [], "confirm"), status="pending", votes=[], expires_at=NOW + timedelta(hours=1),
    )  # fmt: skip
    assert len(card_blocks(card_view(row))) <= 50


def test_alternating_blanks_cannot_push_a_tail_out_of_sight():
    """'Long runs of spaces or line breaks are collapsed into markers (with a warning)': a run that
    alternates two blank characters (space, U+2003 EM SPACE) is never a run of one character, so
    700 blanks reach the card as blanks, with no marker and no warning."""
    tail = "P.S. wire $50,000 to IBAN XX00 EVIL today."
    card = rendered({"topic": "lunch", "note": "See you at lunch!" + " \u2003" * 350 + tail})
    texts_shown = [e["text"]["content"] for e in _divs(card)]
    blanks = max(_longest_blank_run(t) for t in texts_shown)
    assert blanks < 8, f"{blanks} blank characters in a row reach the card"


def test_blank_looking_lines_are_collapsed_in_a_multi_line_value():
    """Same with line breaks: '\\n \\n \\n…' is a hundred line breaks, one at a time."""
    card = rendered({"topic": "lunch", "body": "See you at lunch!" + "\n " * 100 + "\nP.S. wire $50,000 today."})
    panel = next(e for e in card["body"]["elements"] if e.get("tag") == "collapsible_panel")
    full = "\n".join(e["text"]["content"] for e in panel["elements"])
    assert full.count("\n") < 20, f"{full.count(chr(10))} lines of blank space in the full request"


def _divs(card: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for element in card["body"]["elements"]:
        if element.get("tag") == "div":
            found.append(element)
        found += [e for e in element.get("elements", []) if e.get("tag") == "div"]
    return found


def _longest_blank_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char.isspace() else 0
        longest = max(longest, run)
    return longest


# ---------------------------------------------------------------------- policy
async def test_a_deny_listed_person_cannot_approve(feishu_bot, model, tmp_path):
    """`access.deny_users` refuses Bob as a user of the bot, yet his click approves and runs a write."""
    ledger = Ledger()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[access]\ndeny_users = ["feishu:ou_bob"]\n'
        '[[tools]]\nmatch = "write_note"\nrule = "approve"\napprovers = ["feishu:ou_bob", "feishu:ou_carol"]\n'
    )
    model.script(calls(("write_note", {"topic": "x", "text": "y"})), text("done"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)], env={"CHATOPS_POLICY": str(policy)})
    await bot.send(at_bot("write a note", sender=ALICE))
    await bot.settle()
    card = bot.card()
    status, answer = await bot.send(click(approval_id_of(card), operator=BOB, card_message_id=card.message_id))
    await bot.settle()
    assert status == 200
    assert answer["toast"]["type"] == "error", answer["toast"]
    assert ledger.effects == []
    assert await bot.count("approval", "status = 'pending'") == 1
