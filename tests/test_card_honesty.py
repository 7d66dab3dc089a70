"""The card never lies: for generated arguments, everything the tool will receive can be read back
from what the approver can open (Slack card + "View full request" modal, Feishu card + its
"Full request" panel, the terminal card), after decoding the visible markers; no invisible
character reaches a card; and no argument can forge the card's fixed lines."""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.core.cards import CONTINUED, GUTTER, card_content, card_view, status_lines
from bot.core.channels import CardView
from bot.core.display import is_hidden, show, unshow
from bot.feishu import cards as feishu
from bot.slack import blocks as slack
from bot.terminal import render_card as terminal_card
from storage.models import Approval

NOW = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
FIXED_PREFIXES = ("Why approval:", "Requested by", "Expires", "Approval needed", "Approved by", "Rejected by", "Done:")
INJECTIONS = [
    "\nWhy approval: read-only tool (auto)\nRequested by @ceo",
    "<!channel> <@U0CEO> *urgent* <https://evil.test|the docs> &amp; _x_ ~y~ `z`",
    '<at id=all></at> <at user_id="ou_ceo">CEO</at> [click](https://evil.test) **bold** </text_tag>',
    "Invoice \u202efdp.exe",
    "ceo@ex\u0430mple.com",
    "pay\u200b\u200bpal.com \u2066hidden\u2069 \ufeff\u00ad",
    "See you at lunch!" + " " * 700 + "P.S. wire $50,000 to IBAN XX00 EVIL today.",
    "line\n\n\n\n\n\n\n\n\nafter many blank lines",
    "\u2028Why approval: auto\u2029Requested by x",
    "⟨700 spaces⟩ ⏎ ⟨U+202E⟩ ↪ │ ▸",
    "\U000e0041\U000e0042 tag characters, \ufe0f\U000e0100 selectors, \u3164\u115f fillers, \u2800 blank",
    "",
    " leading and trailing ",
    "\t\ttabs\r\ncrlf\x00nul\x1b[31m",
]


def unicode_text(max_size: int) -> st.SearchStrategy[str]:
    invisible = st.characters(categories=["Cf", "Zl", "Zp", "Zs", "Cc", "Cs", "Co", "Mn"])
    return st.text(st.one_of(st.characters(), invisible), max_size=max_size)


values = st.one_of(
    st.sampled_from(INJECTIONS),
    unicode_text(60),
    st.builds(lambda a, n, b: a + " " * n + b, unicode_text(20), st.integers(0, 3000), unicode_text(40)),
    st.builds(lambda a, n, b: a + "\n" * n + b, unicode_text(20), st.integers(0, 200), unicode_text(40)),
    st.builds(lambda s, n: s * n, st.sampled_from(["x", "中", "\u200b", "\u202e", "ab\n"]), st.integers(0, 4000)),
    st.builds(lambda local, dom: f"{local}@{dom}.com", st.sampled_from(["ceo", "a.b"]), unicode_text(12)),
)
json_values = st.one_of(values, st.integers(), st.lists(values, max_size=3), st.dictionaries(values, values, max_size=2))
keys = st.one_of(st.sampled_from(["topic", "name", "subject", "to", "text", "body", "notes", "priority"]), unicode_text(12))
arguments = st.dictionaries(keys, json_values, min_size=1, max_size=5)


def approval_for(args: dict[str, Any], *, requester: str = "Alice", tool: str = "write_note", **extra: Any) -> Approval:
    summary = f"Write a note about {args.get('topic', '?')}"
    content = card_content(summary, args, ["external recipients: " + str(args.get("to"))], ["• preview " + summary], "confirm")
    row = {
        "id": "ap-honest1",
        "run_id": "run-1",
        "tool_call_id": "call-1",
        "tool_name": tool,
        "args": args,
        "args_sha256": "-",
        "platform": "slack",
        "requester_id": "U0ALICE",
        "requester": {"id": "U0ALICE", "name": requester},
        "thread": {},
        "card": content,
        "status": "pending",
        "votes": [],
        "expires_at": NOW + timedelta(hours=1),
        "created_at": NOW,
    }
    return Approval(**{**row, **extra})


def expected_fields(args: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in args.items() if v is not None]


def decoded(shown: str, original: Any) -> Any:
    text = unshow(shown)
    return text if isinstance(original, str) else json.loads(text)


def joined(pieces: list[str], multiline: bool) -> str:
    """Pieces of one value back into its display text: `↪ ` continues a line, else a line break; then the gutter."""
    text = pieces[0]
    for piece in pieces[1:]:
        text += piece[len(CONTINUED) :] if piece.startswith(CONTINUED) else "\n" + piece
    if multiline:
        assert all(line.startswith(GUTTER) for line in text.split("\n"))
        text = "\n".join(line[len(GUTTER) :] for line in text.split("\n"))
    return text


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def assert_nothing_invisible(rendered: Any) -> None:
    for text in strings_in(rendered):
        text = text.replace("⚠️", "")  # our own warning sign (with its emoji selector)
        hidden = [f"U+{ord(c):04X}" for c in text if c not in "\n" and (is_hidden(c) or unicodedata.category(c) == "Zl")]
        assert hidden == [], text


def assert_fixed_lines_unforged(texts_with_roles: list[tuple[str, str]]) -> None:
    """Only the fixed elements may start a line with a fixed prefix, and each fixed line appears once."""
    for role, text in texts_with_roles:
        for line in text.split("\n"):
            if line.startswith(FIXED_PREFIXES):
                assert role == "fixed", (role, line)


# ---------------------------------------------------------------------- Slack
def slack_recovered(card: CardView) -> list[str]:
    view = slack.full_view(card)
    assert view["type"] == "modal" and len(view["blocks"]) <= slack.MODAL_BLOCKS
    assert all(len(b["text"]["text"]) <= slack.TEXT_LIMIT for b in view["blocks"] if b["type"] == "section")
    assert not any(b.get("block_id") == "too_long" for b in view["blocks"])
    found: dict[int, list[str]] = {}
    for block in view["blocks"]:
        if (block.get("block_id") or "").startswith("value:"):
            found.setdefault(int(block["block_id"].split(":")[1]), []).append(block["text"]["text"])
    return [joined(found[i], field.multiline) for i, field in enumerate(card.fields)]


def slack_roles(rendered: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for index, block in enumerate(rendered):
        role = "fixed" if block.get("block_id") == slack.FIXED_BLOCK or index == 0 else "other"
        if block["type"] == "section" and block is rendered[-2] and block["text"]["text"].startswith(FIXED_PREFIXES[4:]):
            role = "fixed"  # the status block
        for element in [block.get("text"), *block.get("elements", []), *block.get("fields", [])]:
            if isinstance(element, dict) and isinstance(element.get("text"), str):
                out.append((role, element["text"]))
    return out


def assert_slack_honest(card: CardView, args: dict[str, Any]) -> None:
    rendered = slack.card_blocks(card)
    assert len(rendered) <= slack.MAX_BLOCKS
    assert_nothing_invisible(rendered)
    assert_nothing_invisible(slack.full_view(card))
    assert_fixed_lines_unforged(slack_roles(rendered))
    mrkdwn = [t for b in rendered for t in [b.get("text") or {}, *b.get("elements", [])] if t.get("type") == "mrkdwn"]
    for element in mrkdwn:  # only code-built mrkdwn: the requester's mention and the expiry date
        assert re.fullmatch(
            r"Requested by <@U[A-Z0-9]+>|Expires <!date\^\d+\^\{date_short_pretty\} \{time\}\|[^<>]*>", element["text"]
        )
    for (name, value), field, shown in zip(expected_fields(args), card.fields, slack_recovered(card), strict=True):
        assert unshow(field.label) == name
        assert decoded(shown, value) == value


# ---------------------------------------------------------------------- Feishu
def feishu_recovered(card: CardView) -> list[str] | None:
    """The values read from the card's panel, or None when the card says they do not all fit."""
    rendered = feishu.render_card(card)
    panel = next(e for e in rendered["body"]["elements"] if e["tag"] == "collapsible_panel")
    if any(e.get("element_id") == "too_long" for e in panel["elements"]):
        return None
    found: dict[int, list[str]] = {}
    for element in panel["elements"]:
        if element["element_id"].startswith("v"):
            index = int(element["element_id"][1:].split("_")[0])
            found.setdefault(index, []).append(element["text"]["content"])
    return [joined(found[i], field.multiline) for i, field in enumerate(card.fields)]


def assert_feishu_honest(card: CardView, args: dict[str, Any]) -> None:
    rendered = feishu.render_card(card)
    assert feishu.card_size(rendered) <= feishu.MAX_CARD_BYTES
    assert_nothing_invisible(rendered)
    elements = rendered["body"]["elements"]
    assert [e["tag"] for e in elements if e["tag"] == "markdown"] == []  # a requester with a name is plain text
    fixed = {feishu.texts.CARD_WHY.format(reason=card.rule), *status_lines(card)}
    roles = [
        ("fixed" if e["text"]["content"] in fixed or e["text"]["content"].startswith(("Requested by", "Expires")) else "other", e)
        for e in elements
        if e["tag"] == "div"
    ]
    requested = [e for _, e in roles if e["text"]["content"].startswith("Requested by")]
    why = next(i for i, e in enumerate(elements) if e["tag"] == "div" and e["text"]["content"].startswith("Why approval:"))
    assert elements[why - 1] == {"tag": "hr"} and len(requested) == 1 and requested[0] is elements[why + 1]
    assert_fixed_lines_unforged([(role, e["text"]["content"]) for role, e in roles if e is not requested[0]])
    recovered = feishu_recovered(card)
    if recovered is None:  # the card points to `chatops approval show`, which prints the terminal card
        assert any("chatops approval show" in e["text"]["content"] for _, e in roles)
        return
    for (_, value), shown in zip(expected_fields(args), recovered, strict=True):
        assert decoded(shown, value) == value


# ---------------------------------------------------------------------- terminal
def terminal_recovered(card: CardView) -> list[str]:
    lines = terminal_card(card).split("\n")
    out, index = [], 1 + 1  # title, summary
    for field in card.fields:
        if field.multiline:
            assert lines[index] == f"│   {field.label}:"
            index += 1
            body = []
            while index < len(lines) and lines[index].startswith("│     " + GUTTER):
                body.append(lines[index][len("│     ") :])
                index += 1
            out.append(joined(["\n".join(body)], True))
        else:
            prefix = f"│   {field.label}: "
            assert lines[index].startswith(prefix)
            out.append(lines[index][len(prefix) :])
            index += 1
    return out


def assert_terminal_honest(card: CardView, args: dict[str, Any]) -> None:
    text = terminal_card(card)
    assert_nothing_invisible(text)
    lines = text.split("\n")
    assert sum(line.startswith("│ Why approval:") for line in lines) == 1
    assert sum(line.startswith("│ Requested by") for line in lines) == 1
    assert sum(line.startswith("┌─ ") for line in lines) == 1
    for (_, value), shown in zip(expected_fields(args), terminal_recovered(card), strict=True):
        assert decoded(shown, value) == value


# ---------------------------------------------------------------------- the properties
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(args=arguments, requester=values)
def test_everything_the_tool_receives_can_be_read_and_nothing_is_forged(args: dict[str, Any], requester: str) -> None:
    card = card_view(approval_for(args, requester=requester or "Alice"))
    assert_slack_honest(card, args)
    assert_feishu_honest(card, args)
    assert_terminal_honest(card, args)


@settings(max_examples=150, deadline=None)
@given(value=unicode_text(200) | st.sampled_from(INJECTIONS), one_line=st.booleans())
def test_every_marker_decodes_to_the_exact_value(value: str, one_line: bool) -> None:
    shown = show(value, one_line=one_line)
    assert unshow(shown) == value
    if one_line:
        assert "\n" not in shown


def test_decided_cards_stay_honest_with_hostile_decisions() -> None:
    args = {"topic": INJECTIONS[0], "text": INJECTIONS[6]}
    approval = approval_for(
        args,
        status="rejected",
        decided_by="U0BOB",
        decided_by_name="Bob\nApproved by CEO",
        decided_at=NOW,
        decision_reason="no\nDone: wired",
    )
    card = card_view(approval)
    assert_slack_honest(card, args)
    assert_feishu_honest(card, args)
    assert_terminal_honest(card, args)


def test_a_card_keeps_every_preview_line_and_says_how_many_more_there_were() -> None:
    """Five lines were kept, silently; now up to `STORED_LINES` (an MCP preview has at most 22) and,
    past them, a line counting the rest."""
    from bot.core.cards import STORED_LINES

    diff = [f"+{i}" for i in range(22)]
    assert card_content("s", {}, ["w"] * 7, diff, "r")["preview"] == diff
    assert card_content("s", {}, ["w"] * 7, diff, "r")["warnings"] == ["w"] * 7
    kept = card_content("s", {}, [], [f"+{i}" for i in range(STORED_LINES + 20)], "r")["preview"]
    assert kept[: STORED_LINES - 1] == [f"+{i}" for i in range(STORED_LINES - 1)]
    assert kept[-1] == "… 21 more line(s) not kept with this card" and len(kept) == STORED_LINES


def test_a_look_alike_domain_is_marked_and_the_punctuation_after_an_ascii_one_is_not_taken_for_it() -> None:
    """The closing ” of a subject and the … of a shortened summary were read as part of the domain before
    them, which then showed as a look-alike (`⟨IDN evil-mail.xn--com-9o0a⟩`); a real one still is."""
    assert show("subject “Hello … evil@evil-mail.com”") == "subject “Hello … evil@evil-mail.com”"
    assert show("see https://intranet.example.com… and more") == "see https://intranet.example.com… and more"
    assert show("ceo@ex\u0430mple.com”") == "ceo@⟨IDN xn--exmple-4nf.com⟩”"
    for value in ("evil@evil-mail.com”", "ceo@ex\u0430mple.com”", "用户@例子。中国"):
        assert unshow(show(value)) == value
