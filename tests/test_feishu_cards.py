"""`CardView` -> Feishu card JSON 2.0, its 30 KB cap, and the card-callback answer."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from bot.core import texts
from bot.core.approvals import DecisionOutcome
from bot.core.cards import card_content, card_view
from bot.core.channels import CardField, CardView
from bot.feishu.cards import MAX_CARD_BYTES, callback_response, card_size, render_card
from storage.models import Approval

NOW = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)


def view(**changes) -> CardView:
    card = CardView(
        approval_id="ap-test",
        tool="create_crm_lead",
        summary="Create the CRM lead Zhang San <zs@example.com>",
        fields=(CardField("name", "Zhang San"), CardField("email", "zs@example.com")),
        requester="ou_alice",
        requester_id="ou_alice",
        expires_at=NOW + timedelta(hours=24),
        status="pending",
        rule="write tool: the requester confirms",
        warnings=("destructive tool",),
        preview=("No lead with this e-mail yet: a new lead will be created.",),
    )
    return replace(card, **changes)


def elements(card: dict) -> list[dict]:
    return card["body"]["elements"]


def plain_texts(card: dict) -> list[str]:
    return [e["text"]["content"] for e in elements(card) if e["tag"] == "div"]


def test_pending_card_shows_everything_and_three_buttons():
    card = render_card(view())
    assert card["schema"] == "2.0" and card["config"]["update_multi"] is True
    assert card["header"]["title"]["content"] == texts.CARD_TITLE
    assert card["header"]["subtitle"]["content"] == "create_crm_lead"
    shown = "\n".join(plain_texts(card))
    for expected in [
        "Create the CRM lead Zhang San",
        "▸ name: Zhang San",
        "▸ email: zs@example.com",
        "destructive tool",
        "No lead with this e-mail yet",
        texts.CARD_WHY.format(reason="write tool: the requester confirms"),
        texts.CARD_EXPIRES.format(at="2026-01-03 03:04 UTC"),
    ]:
        assert expected in shown
    requester = next(e for e in elements(card) if e["tag"] == "markdown")
    assert requester["content"] == texts.CARD_REQUESTED_BY.format(who="<at id=ou_alice></at>")
    form = next(e for e in elements(card) if e["tag"] == "form")
    reason, buttons = form["elements"]
    assert reason["tag"] == "input" and reason["name"] == "reject_reason" and reason["required"] is False
    approve, reject, edit = (c["elements"][0] for c in buttons["columns"])
    assert (approve["type"], reject["type"], edit["type"]) == ("primary", "danger", "default")
    assert approve["behaviors"] == [{"type": "callback", "value": {"action": "approve", "approval_id": "ap-test", "revision": 1}}]
    assert reject["behaviors"][0]["value"] == {"action": "reject", "approval_id": "ap-test", "revision": 1}
    assert edit["behaviors"][0]["value"] == {"action": "edit", "approval_id": "ap-test", "revision": 1}
    assert approve["form_action_type"] == reject["form_action_type"] == edit["form_action_type"] == "submit"


@pytest.mark.parametrize(
    ("status", "line", "colour"),
    [
        ("succeeded", texts.CARD_SUCCEEDED.format(detail="lead #1"), "green"),
        ("rejected", texts.CARD_REJECTED.format(who="Bob", reason="wrong person"), "red"),
        ("expired", texts.CARD_EXPIRED.format(at="2026-01-03 03:04 UTC"), "grey"),
    ],
)
def test_decided_cards_have_no_form_and_show_the_outcome(status, line, colour):
    card = render_card(view(status=status, decided_by="Bob", decided_at=NOW, reason="wrong person", outcome="lead #1"))
    assert not any(e["tag"] == "form" for e in elements(card))
    assert line in plain_texts(card)
    assert card["header"]["template"] == colour


def test_a_decider_feishu_gives_no_name_for_is_shown_by_name_through_a_mention():
    """Feishu's clicks carry an open_id and no name: the card said "Approved by ou_4f3a…"."""
    approved = render_card(view(status="approved", decided_by="ou_bob", decided_by_id="ou_bob", decided_at=NOW))
    mentions = [e["content"] for e in elements(approved) if e["tag"] == "markdown" and "ou_bob" in e["content"]]
    assert mentions == [texts.CARD_APPROVED.format(who="<at id=ou_bob></at>", at="2026-01-02 03:04 UTC")]
    rejected = render_card(view(status="rejected", decided_by="ou_bob", decided_by_id="ou_bob", decided_at=NOW))
    assert texts.CARD_REJECTED_NO_REASON.format(who="<at id=ou_bob></at>") in [e.get("content") for e in elements(rejected)]
    # a line with what someone typed (a reason), or a decider with a name, stays plain text
    reasoned = render_card(
        view(status="rejected", decided_by="ou_bob", decided_by_id="ou_bob", decided_at=NOW, reason="<at id=all></at>")
    )
    assert not [e for e in elements(reasoned) if e["tag"] == "markdown" and "ou_bob" in e["content"]]
    named = render_card(view(status="approved", decided_by="Bob", decided_by_id="ou_bob", decided_at=NOW))
    assert texts.CARD_APPROVED.format(who="Bob", at="2026-01-02 03:04 UTC") in plain_texts(named)


def test_user_text_is_never_markdown():
    hostile = "<at id=all></at> [click](https://evil.example) **bold**"
    card = render_card(view(summary=hostile, fields=(CardField("note", hostile),), requester="Mallory <at id=all></at>"))
    markdown = [e for e in elements(card) if e["tag"] == "markdown"]
    assert markdown == []  # a requester with a display name is plain text too
    assert hostile in plain_texts(card)


@pytest.mark.parametrize("char", ["x", "中", "\x01", '"'])
def test_card_stays_under_the_limit_whatever_the_arguments(char):
    args = {f"arg_{i}": char * 50_000 for i in range(15)}
    content = card_content(char * 10_000, args, [char * 9_000] * 9, [char * 9_000] * 9, char * 9_000)
    approval = Approval(
        id="ap-big", run_id="r", tool_call_id="c", tool_name="t", args=args, args_sha256="-", platform="feishu",
        requester_id="ou_x", requester={"id": "ou_x", "name": char * 300}, thread={}, card=content, status="failed",
        votes=[], expires_at=NOW, created_at=NOW, decision_reason=char * 500, outcome=char * 600,
    )  # fmt: skip
    rendered = render_card(card_view(approval))
    assert card_size(rendered) <= MAX_CARD_BYTES < 30 * 1024
    assert len(json.dumps(rendered, ensure_ascii=False).encode()) == card_size(rendered)
    if char != "\x01":  # 50,000 control characters are one short marker each: everything fits
        assert "do not fit here" in json.dumps(rendered, ensure_ascii=False)  # and says how to see the rest
        assert f"chatops approval show {approval.id}" in json.dumps(rendered, ensure_ascii=False)


def test_small_cards_are_not_cut():
    assert "[cut:" not in json.dumps(render_card(view()), ensure_ascii=False)


def test_callback_answer_has_toast_and_raw_card():
    card = view(status="approved", decided_by="Alice", decided_at=NOW)
    answer = callback_response(DecisionOutcome("approved", "Approved. Running create_crm_lead now.", card))
    assert answer["toast"] == {"type": "success", "content": "Approved. Running create_crm_lead now."}
    assert answer["card"]["type"] == "raw" and answer["card"]["data"] == render_card(card)


def test_refused_click_gets_a_toast_and_no_card():
    answer = callback_response(DecisionOutcome("not_allowed", "You cannot decide this request: no.", view()))
    assert answer == {"toast": {"type": "error", "content": "You cannot decide this request: no."}}


def test_unknown_approval_gets_an_error_toast():
    assert callback_response(DecisionOutcome("not_found", "I do not know approval ap-x.")) == {
        "toast": {"type": "error", "content": "I do not know approval ap-x."}
    }
