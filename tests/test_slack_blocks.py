"""Block Kit rendering of the approval card: what the approver reads is exact, inert and within limits."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from bot.core import texts
from bot.core.channels import CardField, CardView
from bot.slack import blocks
from bot.slack.events import APPROVE_ACTION, REASON_BLOCK, REJECT_ACTION, REJECT_VIEW, VIEW_ACTION

EXPIRES = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
CARD = CardView(
    approval_id="ap-abc",
    tool="write_note",
    summary="Write a note about <!channel> ops",
    fields=(CardField("topic", "ops"), CardField("text", "restart <!here> *web-1* :fire: <https://x.test|click>")),
    requester="Alice",
    requester_id="U0ALICE",
    expires_at=EXPIRES,
    status="pending",
    rule="write tool: the requester confirms",
)


def texts_of(rendered: list[dict[str, Any]]) -> str:
    return json.dumps(rendered, ensure_ascii=False)


def assert_within_limits(rendered: list[dict[str, Any]]) -> None:
    assert len(rendered) <= blocks.MAX_BLOCKS
    for block in rendered:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= blocks.HEADER_LIMIT and block["text"]["type"] == "plain_text"
        if block["type"] == "section":
            assert "text" in block or "fields" in block
            if "text" in block:
                assert 0 < len(block["text"]["text"]) <= blocks.TEXT_LIMIT
            fields = block.get("fields", [])
            assert len(fields) <= blocks.FIELDS_PER_SECTION
            assert all(0 < len(f["text"]) <= blocks.FIELD_LIMIT for f in fields)
        if block["type"] == "context":
            assert all(len(e["text"]) <= blocks.TEXT_LIMIT for e in block["elements"])
        if block["type"] == "actions":
            assert all(len(e["text"]["text"]) <= blocks.BUTTON_LIMIT for e in block["elements"])


def test_a_pending_card_shows_everything_two_decision_buttons_and_the_full_request():
    rendered = blocks.card_blocks(CARD)
    assert_within_limits(rendered)
    assert rendered[0] == {"type": "header", "text": {"type": "plain_text", "text": texts.CARD_TITLE, "emoji": False}}
    assert rendered[1] == {"type": "section", "text": {"type": "plain_text", "text": CARD.summary, "emoji": False}}
    actions = rendered[-1]
    assert actions["type"] == "actions"
    assert actions["block_id"] == "chatops_decide:ap-abc@1"  # the revision the buttons act on
    approve, reject, edit, full = actions["elements"]
    assert (full["action_id"], full["value"], full["text"]["text"]) == (VIEW_ACTION, "ap-abc", texts.FULL_REQUEST)
    assert (edit["action_id"], edit["value"], edit["text"]["text"]) == ("chatops_edit", "ap-abc", texts.EDIT)
    assert (approve["action_id"], approve["style"], approve["value"], approve["text"]["text"]) == (
        APPROVE_ACTION,
        "primary",
        "ap-abc",
        texts.APPROVE,
    )
    assert (reject["action_id"], reject["style"], reject["value"], reject["text"]["text"]) == (
        REJECT_ACTION,
        "danger",
        "ap-abc",
        texts.REJECT,
    )
    everything = texts_of(rendered)
    assert "<@U0ALICE>" in everything
    assert f"<!date^{int(EXPIRES.timestamp())}^" in everything and "2030-01-02 03:04 UTC" in everything
    assert "write_note" in everything and texts.CARD_WHY.format(reason=CARD.rule) in everything


def test_argument_values_are_shown_exactly_as_frozen_and_cannot_ping_or_link():
    rendered = blocks.card_blocks(CARD)
    sections = [b["text"] for b in rendered if b["type"] == "section"]
    assert {"type": "plain_text", "text": "▸ topic: ops", "emoji": False} in sections
    assert {"type": "plain_text", "text": f"▸ text: {CARD.fields[1].value}", "emoji": False} in sections
    mrkdwn = [t["text"] for b in rendered for t in [b.get("text", {}), *b.get("elements", [])] if t.get("type") == "mrkdwn"]
    assert not any(re.search(r"<!(?!date\^)|<http", t) for t in mrkdwn)  # only our own <!date^…> token


def test_huge_cards_are_cut_to_block_kit_limits():
    big = "x" * 9000
    card = replace(
        CARD,
        tool="t" * 400,
        summary=big,
        fields=tuple(CardField(f"label{i}" * 50, big) for i in range(12)),
        warnings=tuple(big for _ in range(8)),
        preview=tuple(big for _ in range(8)),
        rule=big,
    )
    rendered = blocks.card_blocks(card)
    assert_within_limits(rendered)
    assert "more characters in the full request" in texts_of(rendered)
    assert texts.CARD_FULL_SLACK in texts_of(rendered)
    assert rendered[-1]["type"] == "actions"
    assert len(blocks.card_text(card)) <= blocks.TEXT_LIMIT


@pytest.mark.parametrize(
    ("status", "extra", "expected"),
    [
        (
            "succeeded",
            {"outcome": "note <!here> stored"},
            ["Approved by bob at 2030-01-01 00:00 UTC", "Done: note <!here> stored"],
        ),
        ("rejected", {"reason": "<!channel> not now"}, ["Rejected by bob: <!channel> not now"]),
        ("rejected", {}, ["Rejected by bob"]),
        ("expired", {}, ["Expired at 2030-01-02 03:04 UTC: nothing was run"]),
        ("failed", {"outcome": "refused"}, ["Approved by bob at 2030-01-01 00:00 UTC", "Failed: refused"]),
    ],
)
def test_a_decided_card_has_no_decision_buttons_and_says_who_decided_and_what_happened(status, extra, expected):
    decided = replace(
        CARD, status=status, decided_by="bob", decided_by_id="U0BOB", decided_at=datetime(2030, 1, 1, tzinfo=UTC), **extra
    )
    rendered = blocks.card_blocks(decided)
    assert_within_limits(rendered)
    assert [e["action_id"] for b in rendered if b["type"] == "actions" for e in b["elements"]] == [VIEW_ACTION]
    status_block = rendered[-2]  # plain text: user words can neither ping nor format
    assert status_block == {"type": "section", "text": {"type": "plain_text", "text": "\n".join(expected), "emoji": False}}
    assert blocks.card_text(decided).endswith(blocks.escape(expected[-1]))


def test_the_fallback_text_is_escaped():
    assert blocks.card_text(CARD) == "Approval needed: Write a note about &lt;!channel&gt; ops"


def test_model_replies_keep_user_mentions_but_lose_pings_and_disguised_links():
    text = "Hi <@U0ALICE>, done <!channel> see <https://evil.test|the docs> & more"
    assert blocks.safe_message(text) == "Hi <@U0ALICE>, done &lt;!channel&gt; see &lt;https://evil.test|the docs&gt; &amp; more"


def test_long_replies_are_split_at_line_breaks():
    text = "\n".join(f"line {i:04d}" for i in range(2000))
    parts = blocks.split_message(text, limit=1000)
    assert all(len(p) <= 1000 for p in parts)
    assert "\n".join(parts) == text
    assert blocks.split_message("short") == ["short"]


def test_the_reject_modal_asks_for_an_optional_reason_and_remembers_the_place():
    view = blocks.reject_modal("ap-abc", {"channel": "C0OPS", "thread_ts": "1.0"})
    assert view["type"] == "modal" and view["callback_id"] == REJECT_VIEW
    assert json.loads(view["private_metadata"]) == {"approval_id": "ap-abc", "channel": "C0OPS", "thread_ts": "1.0"}
    assert len(view["title"]["text"]) <= 24 and len(view["submit"]["text"]) <= 24
    (field,) = view["blocks"]
    assert field["type"] == "input" and field["block_id"] == REASON_BLOCK and field["optional"] is True
    assert field["label"]["text"] == texts.REJECT_REASON_PROMPT
    assert field["element"]["type"] == "plain_text_input"


def test_the_full_request_modal_says_when_even_100_blocks_are_too_few():
    card = replace(CARD, fields=(CardField("topic", "ops"), CardField("text", "word " * 80_000, multiline=True)))
    view = blocks.full_view(card)
    assert len(view["blocks"]) == blocks.MODAL_BLOCKS and len(view["title"]["text"]) <= 24
    assert all(len(b["text"]["text"]) <= blocks.TEXT_LIMIT for b in view["blocks"] if b["type"] == "section")
    notice = view["blocks"][-1]
    assert notice["block_id"] == "too_long"
    assert "do not fit here" in notice["text"]["text"] and "chatops approval show ap-abc" in notice["text"]["text"]
    shown = sum(len(b["text"]["text"]) for b in view["blocks"] if b.get("block_id", "").startswith("value:1:"))
    missing = int(notice["text"]["text"].split(" ")[0])
    assert shown + missing >= len("word " * 80_000)  # every character is either shown or counted as missing


def arguments_on(rendered: list[dict[str, Any]]) -> tuple[list[str], int]:
    """The arguments the compact card shows (each `▸ label:`), and how many its closing line says
    only the full request shows (it names them, as many as its 3,000 characters hold)."""
    shown = "\n".join(b["text"]["text"] for b in rendered if b["type"] == "section")
    more = re.search(r"^(\d+) more argument\(s\) in the full request: (.*)$", shown, re.M)
    return re.findall(r"^▸ (\S+?):", shown, re.M), int(more.group(1)) if more else 0


@pytest.mark.parametrize("count", [11, 60, 900, 9000])
def test_every_argument_is_on_the_card_or_named_as_only_in_the_full_request(count):
    """An argument after the tenth was once left off the card without a word (the model orders the keys,
    so it could push `drop_database` out of sight). Now each one shows, packed and shortened if need be;
    past what 50 blocks hold, the closing line names the rest."""
    many = tuple(CardField(f"arg{i}", f"value {i}") for i in range(count))
    bodies = tuple(CardField(f"body{i}", "first line\nsecond line", multiline=True) for i in range(5))
    card = replace(CARD, fields=(*many, *bodies, CardField("drop_database", "True")))
    rendered = blocks.card_blocks(card)
    assert_within_limits(rendered)
    shown, left = arguments_on(rendered)
    labels = [f.label for f in sorted(card.fields, key=lambda f: f.multiline)]
    assert shown == labels[: len(shown)] and len(shown) + left == len(labels)
    assert (left > 0) == (count == 9000)
    assert ("▸ drop_database: True" in texts_of(rendered)) == (count < 9000)
    # Packed, nothing is cut; only when some are left to the full request does the card send people there.
    assert (texts.CARD_FULL_SLACK in texts_of(rendered)) == (count == 9000)
    one_each = {"type": "plain_text", "text": "▸ arg10: value 10", "emoji": False} in [b["text"] for b in rendered if "text" in b]
    assert one_each == (count == 11)  # few enough for a section each


def test_every_warning_and_preview_line_is_on_the_card_and_in_the_full_request():
    """A preview (a staged diff) was cut to its first five lines with no marker: the file after them was
    committed unseen. The card and the full request now show every line kept with the card."""
    preview = tuple(f"+line {i} " + "x" * 250 for i in range(22))
    warnings = tuple(f"warning {i} " + "y" * 250 for i in range(12))
    card = replace(CARD, preview=preview, warnings=warnings, fields=tuple(CardField(f"a{i}", "v" * 400) for i in range(30)))
    for rendered in (blocks.card_blocks(card), blocks.full_view(card)["blocks"]):
        shown = "\n".join(b["text"]["text"] for b in rendered if b["type"] == "section")
        assert all(f"• {line}" in shown for line in preview)
        assert all(f"⚠️ {line}" in shown for line in warnings)
    assert_within_limits(blocks.card_blocks(card))
