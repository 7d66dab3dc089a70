"""Edit before approve on Slack: the Edit button opens a modal (views.open with the click's
trigger_id) with typed inputs; a bad value is refused inside the modal under its field; a good
edit updates the card, and a click on the card as it was before the edit acts on nothing."""

from __future__ import annotations

import copy
import json
from typing import Any

from bot.slack.events import ARG_BLOCK, ARG_INPUT, EDIT_ACTION, EDIT_VIEW
from storage.models import Approval
from tests.fakes.openai_server import calls, text, tool_results
from tests.slack_helpers import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    approval_id_of,
    card_message,
    click,
    fake_slack_fixture,
    interaction,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})


def edit_click(message: dict[str, Any], *, user: str = ALICE) -> dict[str, Any]:
    """A click on the card's Edit button, exactly as the card carries it (block id included)."""
    payload = click(message, user=user)
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    button = next(e for e in actions["elements"] if e["action_id"] == EDIT_ACTION)
    payload["actions"] = [
        {**payload["actions"][0], "action_id": EDIT_ACTION, "block_id": actions["block_id"], "value": button["value"]}
    ]
    return payload


def approve_click(message: dict[str, Any], *, user: str = ALICE) -> dict[str, Any]:
    """An Approve click on `message` as it looked then (the block id carries its revision)."""
    payload = click(message, user=user)
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    payload["actions"][0]["block_id"] = actions["block_id"]
    return payload


def submission(view: dict[str, Any], changes: dict[str, str], *, user: str = ALICE) -> dict[str, Any]:
    """A `view_submission` of the Edit modal: every input as Slack reports it, `changes` typed over."""
    values: dict[str, Any] = {}
    for block in view["blocks"]:
        if block["type"] != "input":
            continue
        name, element = block["block_id"][len(ARG_BLOCK) :], block["element"]
        if element["type"] == "static_select":
            chosen = {"value": changes[name]} if name in changes else element.get("initial_option")
            values[block["block_id"]] = {ARG_INPUT: {"type": "static_select", "selected_option": chosen}}
        else:
            typed = changes.get(name, element.get("initial_value"))
            values[block["block_id"]] = {ARG_INPUT: {"type": element["type"], "value": typed}}
    return {**interaction("view_submission", user), "view": {**view, "state": {"values": values}}}


async def test_edit_modal_refuses_bad_values_in_the_form_then_updates_the_card_and_old_clicks_act_on_nothing(
    slack_bot, fake_slack, model
):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."))
    fake_slack.add_user(ALICE, "Alice")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("write a note", ts=next_ts()))
    await bot.settle()
    card = card_message(fake_slack)
    before_edit = copy.deepcopy(card)
    approval_id = approval_id_of(card)
    actions = [e["action_id"] for b in card["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert actions == ["chatops_approve", "chatops_reject", EDIT_ACTION, "chatops_view_full"]

    opened_click = edit_click(card)
    assert (await bot.send(opened_click))[0] == 200
    (opened,) = await fake_slack.wait_for("views.open")
    assert opened.params["trigger_id"] == opened_click["trigger_id"]
    view = opened.params["view"]
    assert view["callback_id"] == EDIT_VIEW
    inputs = {b["block_id"]: b for b in view["blocks"] if b["type"] == "input"}
    assert inputs["arg:topic"]["element"]["initial_value"] == "ops" and inputs["arg:topic"]["optional"] is False
    assert inputs["arg:text"]["element"]["type"] == "plain_text_input"
    assert inputs["arg:priority"]["element"] == {
        "type": "number_input", "is_decimal_allowed": False, "initial_value": "1", "action_id": ARG_INPUT,
    }  # fmt: skip
    assert inputs["arg:priority"]["optional"] is True

    status, body = await bot.send(submission(view, {"priority": "very high"}))
    assert status == 200
    assert json.loads(body) == {"response_action": "errors", "errors": {"arg:priority": "must be a whole number"}}
    status, body = await bot.send(submission(view, {"topic": ""}))
    assert json.loads(body)["errors"] == {"arg:topic": "a value is required"}
    await bot.settle()
    async with bot.app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None and row.revision == 1 and row.args == {**NOTE[1], "priority": 1}

    status, body = await bot.send(submission(view, {"text": "restart web-2", "priority": "4"}))
    assert (status, body) == (200, "")  # the modal closes
    await bot.settle()
    updated = fake_slack.messages[card["ts"]]["blocks"]
    shown = json.dumps(updated, ensure_ascii=False)
    assert "restart web-2" in shown and "Edited by u0alice (version 2)" in shown
    assert f"chatops_decide:{approval_id}@2" in shown
    (told,) = [c for c in fake_slack.calls_to("chat.postEphemeral") if "Edited." in c.params["text"]]
    assert told.params["user"] == ALICE

    assert (await bot.send(approve_click(before_edit)))[0] == 200  # the card as it was before the edit
    await bot.settle()
    assert ledger.effects == []
    stale = fake_slack.calls_to("chat.postEphemeral")[-1]
    assert "older version of the request" in stale.params["text"]

    assert (await bot.send(approve_click({**card, "blocks": updated})))[0] == 200
    await bot.settle()
    assert ledger.effects == [{"topic": "ops", "text": "restart web-2", "priority": 4, "approval_id": approval_id}]
    (result,) = tool_results(model.requests[-1])
    assert result.startswith("Note: u0alice edited the arguments") and '"priority":4' in result


async def test_someone_who_may_not_decide_cannot_open_the_edit_form(slack_bot, fake_slack, model):
    model.script(calls(NOTE), text("ok"))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(mention("write a note", ts=next_ts()))
    await bot.settle()
    card = card_message(fake_slack)
    assert (await bot.send(edit_click(card, user=BOB)))[0] == 200
    await bot.settle()
    assert fake_slack.calls_to("views.open") == []
    (told,) = fake_slack.calls_to("chat.postEphemeral")
    assert told.params["user"] == BOB and told.params["text"].startswith("You cannot edit this request")
