"""Edit before approve on Feishu: the card's Edit button answers with a card 2.0 form of typed inputs;
Save goes through the same card callback, bad values come back as an error toast naming the field
(the form stays), a good edit replaces the card, and the card's old buttons act on nothing."""

from __future__ import annotations

import json
from typing import Any

from storage.models import Approval
from tests.fakes.openai_server import calls, text, tool_results
from tests.feishu_helpers import (
    ALICE,
    approval_id_of,
    at_bot,
    card_text,
    click,
    fake_feishu,
    feishu_bot,
)
from tests.support_tools import Ledger, notes_toolset

__all__ = ["fake_feishu", "feishu_bot"]  # fixtures used by this module

NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})


def buttons(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every callback button of a card (in its forms) by its action, with its callback value."""
    found = {}
    for element in card["body"]["elements"]:
        if element.get("tag") != "form":
            continue
        for row in element["elements"]:
            for column in row.get("columns", []):
                for button in column["elements"]:
                    value = button["behaviors"][0]["value"]
                    found[value["action"]] = value
    return found


def press(value: dict[str, Any], form_value: dict[str, Any] | None = None, operator: str = ALICE) -> dict[str, Any]:
    """A `card.action.trigger` for a button with this callback value (and this form content)."""
    payload = click(value["approval_id"], "approve", operator=operator)
    payload["event"]["action"]["value"] = value
    payload["event"]["action"]["form_value"] = form_value or {}
    return payload


def form_inputs(card: dict[str, Any]) -> list[dict[str, Any]]:
    form = next(e for e in card["body"]["elements"] if e.get("tag") == "form")
    return [e for e in form["elements"] if e.get("tag") in ("input", "select_static")]


async def test_edit_form_card_refuses_bad_values_then_replaces_the_card_and_old_buttons_act_on_nothing(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("write a note", message_id="om_ask"))
    await bot.settle()
    card = bot.card()
    approval_id = approval_id_of(card)
    first = buttons(card.json)
    assert set(first) == {"approve", "reject", "edit"} and first["edit"]["revision"] == 1

    status, answer = await bot.send(press(first["edit"]))
    assert status == 200 and "toast" not in answer
    form = answer["card"]["data"]
    inputs = form_inputs(form)
    assert [(i["tag"], i["name"], i["label"]["content"], i.get("default_value")) for i in inputs] == [
        ("input", "arg_0", "topic", "ops"),
        ("input", "arg_1", "text", "restart web-1"),
        ("input", "arg_2", "priority", "1"),
    ]
    assert [i["required"] for i in inputs] == [True, True, False]
    save = buttons(form)["edit_submit"]
    assert save["fields"] == ["topic", "text", "priority"] and save["revision"] == 1

    status, answer = await bot.send(press(save, {"arg_0": "ops", "arg_1": "restart web-1", "arg_2": "soon"}))
    assert status == 200 and answer["toast"]["type"] == "error" and "priority" in answer["toast"]["content"]
    assert "card" not in answer  # the form stays for another try
    async with bot.app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None and row.revision == 1

    status, answer = await bot.send(press(save, {"arg_0": "ops", "arg_1": "restart web-2", "arg_2": "5"}))
    assert answer["toast"]["type"] == "success"
    new_card = answer["card"]["data"]
    assert "restart web-2" in json.dumps(new_card, ensure_ascii=False) and buttons(new_card)["approve"]["revision"] == 2
    await bot.settle()
    assert "restart web-2" in card_text(bot.fake.messages[card.message_id])  # patched for everyone

    status, answer = await bot.send(press(first["approve"]))  # the button as it was before the edit
    assert answer["toast"]["type"] == "warning" and ledger.effects == []
    await bot.settle()
    status, answer = await bot.send(press(buttons(new_card)["approve"]))
    assert answer["toast"]["type"] == "success"
    await bot.settle()
    assert ledger.effects == [{"topic": "ops", "text": "restart web-2", "priority": 5, "approval_id": approval_id}]
    (result,) = tool_results(model.requests[-1])
    assert ALICE in result and '"text":"restart web-2"' in result


async def test_cancel_puts_the_card_back_and_others_cannot_open_the_form(feishu_bot, model):
    model.script(calls(NOTE), text("ok"))
    bot = await feishu_bot(toolsets=[notes_toolset(Ledger())])
    await bot.send(at_bot("write a note", message_id="om_ask"))
    await bot.settle()
    edit = buttons(bot.card().json)["edit"]
    _, answer = await bot.send(press(edit, operator="ou_mallory"))
    assert answer["toast"]["type"] == "error" and "card" not in answer
    _, answer = await bot.send(press(edit))
    cancel = buttons(answer["card"]["data"])["edit_cancel"]
    _, answer = await bot.send(press(cancel))
    assert set(buttons(answer["card"]["data"])) == {"approve", "reject", "edit"}
