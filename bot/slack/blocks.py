"""Block Kit rendering: the approval card, the "View full request", reject-reason and Edit modals,
and safe message text.

What belongs here: turning the platform-neutral `CardView` into Slack blocks, and nothing
else. Every value that came from the model or a user (arguments, names, reasons, outcomes) is
shown as plain text (`emoji: false`), never mrkdwn, so it can neither ping `@channel`, hide a
link, bold a forged line nor change what the approver reads; the only mrkdwn is code-built
(the requester's `<@U…>` mention, the expiry date). The card shows values shortened (saying
so); the modal shows every argument complete, split over up to 100 blocks, and says plainly
when even that is not enough. Block Kit limits: header <= 150, section text <= 3000, <= 10
fields of <= 2000 per section, button text <= 75, <= 50 blocks per message, 100 per modal.
The card's buttons sit in a block whose id names the call's revision, so a click on a card that
an edit has replaced is refused. The Edit modal has one typed input per argument (text, number,
a Yes/No or option select, JSON text); a value longer than an input holds is listed as kept.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from bot.core import i18n, texts
from bot.core.cards import chunks, quoted, shorten, status_lines
from bot.core.channels import CardView
from bot.core.edit_form import EditField, EditForm
from bot.slack.events import (
    APPROVE_ACTION,
    ARG_BLOCK,
    ARG_INPUT,
    EDIT_ACTION,
    EDIT_VIEW,
    FULL_VIEW,
    REASON_BLOCK,
    REASON_INPUT,
    REJECT_ACTION,
    REJECT_VIEW,
    VIEW_ACTION,
    decide_block,
)

HEADER_LIMIT = 150
TEXT_LIMIT = 3000
FIELD_LIMIT = 2000
FIELDS_PER_SECTION = 10
BUTTON_LIMIT = 75
MAX_BLOCKS = 50
MESSAGE_LIMIT = 39_000  # Slack truncates message text at 40,000 characters
MODAL_BLOCKS = 100
COMPACT_VALUE = 300  # a one-line value on the card; the modal shows it whole
COMPACT_MULTILINE = 1500  # a multi-line value (a mail body) on the card
TIGHT_VALUE = 80  # the same when that many arguments would not fit the card's blocks otherwise
TIGHT_MULTILINE = 300
FIXED_BLOCK = "chatops_fixed"
INPUT_LIMIT = 3000  # plain_text_input max_length; a longer value cannot be edited in a modal
OPTIONS_LIMIT = 100
OPTION_TEXT = 75

_USER_MENTION = re.compile(r"&lt;@([UW][A-Z0-9]+)&gt;")


def clip(text: str, limit: int) -> str:
    """`text` (rendered in the current language) cut to `limit` characters with a visible marker."""
    text = str(text)
    if len(text) <= limit:
        return text
    marker = texts.CARD_TRUNCATED.format(more=len(text) - limit)
    return text[: max(0, limit - len(marker))] + marker


def escape(text: str) -> str:
    """Escape the three characters Slack mrkdwn treats as control (`&`, `<`, `>`)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def safe_message(text: str) -> str:
    """Model text for `chat.postMessage`: no `<!channel>` pings or disguised links; user mentions kept."""
    return _USER_MENTION.sub(r"<@\1>", escape(text))


def plain(text: str, limit: int = TEXT_LIMIT) -> dict[str, Any]:
    return {"type": "plain_text", "text": clip(text, limit) or " ", "emoji": False}


def mrkdwn(text: str, limit: int = TEXT_LIMIT) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": clip(text, limit) or " "}


def slack_date(at: datetime) -> str:
    """A time each reader sees in their own time zone, with the UTC text as fallback."""
    return f"<!date^{int(at.timestamp())}^{{date_short_pretty}} {{time}}|{texts.when(at)}>"


def _field_texts(card: CardView, one_line: int, multi_line: int) -> tuple[list[str], bool]:
    """Each argument as the card shows it (`▸ label: value`; multi-line values quoted below the label),
    values cut to `one_line` / `multi_line` characters; and whether any was cut."""
    shown: list[str] = []
    cut_any = False
    for field in sorted(card.fields, key=lambda f: f.multiline):  # one-line values first, as they read best
        if field.multiline:
            value, was_cut = shorten(quoted(field.value), multi_line)
            shown.append(f"▸ {field.label}:\n{value}")
        else:
            value, was_cut = shorten(field.value, one_line)
            shown.append(f"▸ {field.label}: {value}")
        cut_any = cut_any or was_cut
    return shown, cut_any


def _packed(shown: list[str], *, room: int | None = None) -> tuple[list[str], int]:
    """Consecutive texts joined into as few sections of at most `TEXT_LIMIT` characters as they fit
    in, at most `room` sections (None: as many as needed); and how many of the texts they hold."""
    sections: list[str] = []
    for kept, text in enumerate(shown):
        if sections and len(sections[-1]) + 1 + len(text) <= TEXT_LIMIT:
            sections[-1] += "\n" + text
        elif room is None or len(sections) < room:
            sections.append(text)
        else:
            return sections, kept
    return sections, len(shown)


def compact_fields(card: CardView, room: int) -> tuple[list[dict[str, Any]], bool]:
    """Every argument on the card in at most `room` blocks, values shortened: a section each when they
    fit, else packed several to a section, else shorter. Never one left out unsaid: should even the
    shortest form not fit, the last block names the arguments only the full request shows. Returns
    the blocks and whether anything was shortened or left out."""
    room = max(1, room)
    for one_line, multi_line in ((COMPACT_VALUE, COMPACT_MULTILINE), (TIGHT_VALUE, TIGHT_MULTILINE)):
        shown, cut_any = _field_texts(card, one_line, multi_line)
        sections = shown if len(shown) <= room else _packed(shown)[0]
        if len(sections) <= room:
            return [{"type": "section", "text": plain(text)} for text in sections], cut_any
    sections, kept = _packed(shown, room=room - 1)  # the tight form, as many as fit before the closing line
    left = [f.label for f in sorted(card.fields, key=lambda f: f.multiline)][kept:]
    more = texts.CARD_MORE_FIELDS.format(count=len(left)) + ": " + ", ".join(left)
    return [*({"type": "section", "text": plain(text)} for text in sections), {"type": "section", "text": plain(more)}], True


def line_sections(lines: tuple[str, ...], lead: str) -> list[dict[str, Any]]:
    """Warnings or preview lines, each led by `lead`, over as many sections as they need (none cut)."""
    return [{"type": "section", "text": plain(text)} for text in _packed([lead + line for line in lines])[0]]


def _status_block(card: CardView) -> dict[str, Any] | None:
    lines = status_lines(card)
    return {"type": "section", "text": plain("\n".join(lines))} if lines else None


def _fixed_lines(card: CardView) -> dict[str, Any]:
    """Why approval, who asked, when it expires: built by code, user text only as plain text."""
    if card.requester_id and re.fullmatch(r"[UW][A-Z0-9]+", card.requester_id):
        requested = mrkdwn(texts.CARD_REQUESTED_BY.format(who=f"<@{card.requester_id}>"))
    else:
        requested = plain(texts.CARD_REQUESTED_BY.format(who=card.requester))
    return {
        "type": "context",
        "block_id": FIXED_BLOCK,
        "elements": [
            plain(texts.CARD_WHY.format(reason=texts.localize(card.rule) or "")),
            requested,
            mrkdwn(texts.CARD_EXPIRES.format(at=slack_date(card.expires_at))),
        ],
    }


def card_blocks(card: CardView) -> list[dict[str, Any]]:
    """The approval card in its requester's language: Approve/Reject while pending, and always a way
    to see the full request."""
    with i18n.speaking(card.lang, card.tz):
        return _card_blocks(card)


def _card_blocks(card: CardView) -> list[dict[str, Any]]:
    head: list[dict[str, Any]] = [
        {"type": "header", "text": plain(texts.CARD_TITLE, HEADER_LIMIT)},
        {"type": "section", "text": plain(card.summary)},
        {"type": "context", "elements": [plain(f"{card.tool} · {card.approval_id}")]},
    ]
    tail = [*line_sections(card.warnings, "⚠️ "), *line_sections(card.preview, "• "), _fixed_lines(card)]
    status = _status_block(card)
    if status is not None:
        tail.append(status)
    # The rest of the card's blocks go to the arguments: one more for the buttons, one for the "shortened" line.
    fields, shortened = compact_fields(card, MAX_BLOCKS - len(head) - len(tail) - 2)
    blocks = [*head, *fields]
    if shortened:
        blocks.append({"type": "section", "text": plain(texts.CARD_FULL_SLACK)})
    blocks += tail
    buttons = [_button(texts.FULL_REQUEST, VIEW_ACTION, card.approval_id, None)]
    if card.actionable:
        buttons = [
            _button(texts.APPROVE, APPROVE_ACTION, card.approval_id, "primary"),
            _button(texts.REJECT, REJECT_ACTION, card.approval_id, "danger"),
            _button(texts.EDIT, EDIT_ACTION, card.approval_id, None),
            *buttons,
        ]
    blocks.append({"type": "actions", "block_id": decide_block(card.approval_id, card.revision), "elements": buttons})
    return blocks


def _button(label: str, action_id: str, approval_id: str, style: str | None) -> dict[str, Any]:
    button = {"type": "button", "text": plain(label, BUTTON_LIMIT), "action_id": action_id, "value": approval_id[:2000]}
    if style:
        button["style"] = style
    return button


def card_text(card: CardView) -> str:
    """The notification / screen-reader fallback for the card."""
    with i18n.speaking(card.lang, card.tz):
        lines = [f"{texts.CARD_TITLE}: {card.summary}", *status_lines(card)]
        return clip(escape("\n".join(lines)), TEXT_LIMIT)


def full_view(card: CardView) -> dict[str, Any]:
    """The "View full request" modal: every argument complete, over as many blocks as Slack allows."""
    with i18n.speaking(card.lang, card.tz):
        return _full_view(card)


def _full_view(card: CardView) -> dict[str, Any]:
    head: list[dict[str, Any]] = [
        {"type": "section", "text": plain(card.summary)},
        {"type": "context", "elements": [plain(f"{card.tool} · {card.approval_id}")]},
    ]
    head += [*line_sections(card.warnings, "⚠️ "), *line_sections(card.preview, "• "), _fixed_lines(card)]
    body: list[dict[str, Any]] = []
    left_out = 0
    room = MODAL_BLOCKS - len(head) - 1  # one block kept for the "does not fit" notice
    for index, field in enumerate(card.fields):
        pieces = chunks(quoted(field.value) if field.multiline else field.value, TEXT_LIMIT)
        if left_out or len(body) + 1 + len(pieces) > room:
            fits = max(0, room - len(body) - 1) if not left_out else 0
            left_out += sum(len(c) for c in pieces[fits:])
            pieces = pieces[:fits]
            if not pieces:
                continue
        body.append({"type": "section", "block_id": f"label:{index}", "text": plain(field.label + ":")})
        body += [{"type": "section", "block_id": f"value:{index}:{n}", "text": plain(piece)} for n, piece in enumerate(pieces)]
    if left_out:
        notice = texts.FULL_TOO_LONG.format(more=left_out, approval_id=card.approval_id)
        body.append({"type": "section", "block_id": "too_long", "text": plain(notice)})
    return {
        "type": "modal",
        "callback_id": FULL_VIEW,
        "private_metadata": json.dumps({"approval_id": card.approval_id})[:3000],
        "title": plain(texts.FULL_TITLE, 24),
        "close": plain("Close", 24),
        "blocks": head + body,
    }


def reject_modal(approval_id: str, place: dict[str, Any]) -> dict[str, Any]:
    """The modal that asks why (optional) before rejecting; its metadata says which approval and where."""
    meta = json.dumps({"approval_id": approval_id, **place})
    return {
        "type": "modal",
        "callback_id": REJECT_VIEW,
        "private_metadata": meta[:3000],
        "title": plain(texts.REJECT, 24),
        "submit": plain(texts.REJECT, 24),
        "blocks": [
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "optional": True,
                "label": plain(texts.REJECT_REASON_PROMPT, 2000),
                "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True, "max_length": 2000},
            }
        ],
    }


def edit_modal(form: EditForm, place: dict[str, Any], lang: str | None, tz: str | None) -> dict[str, Any]:
    """The Edit modal: one typed input per argument, prefilled with the frozen value, in the editor's language."""
    with i18n.speaking(lang, tz):
        return _edit_modal(form, place)


def _edit_modal(form: EditForm, place: dict[str, Any]) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [
        {"type": "context", "elements": [plain(f"{form.tool} · {form.approval_id}")]},
        {"type": "section", "text": plain(texts.EDIT_HINT)},
    ]
    first = None
    for field in form.fields:
        if len(blocks) >= MODAL_BLOCKS:
            break
        if len(field.value) > INPUT_LIMIT:
            blocks.append({"type": "section", "text": plain(texts.EDIT_KEPT.format(field=field.name))})
            continue
        block: dict[str, Any] = {
            "type": "input",
            "block_id": (ARG_BLOCK + field.name)[:255],
            "optional": not field.required,
            "label": plain(field.name, 2000),
            "element": _input(field),
        }
        if field.description:
            block["hint"] = plain(field.description, 2000)
        first = first or block["block_id"]
        blocks.append(block)
    meta = {"approval_id": form.approval_id, "revision": form.revision, "first": first, **place}
    return {
        "type": "modal",
        "callback_id": EDIT_VIEW,
        "private_metadata": json.dumps(meta)[:3000],
        "title": plain(texts.EDIT_TITLE, 24),
        "submit": plain(texts.EDIT_SAVE, 24),
        "close": plain(texts.EDIT_CANCEL, 24),
        "blocks": blocks,
    }


def _option(label: str, value: str) -> dict[str, Any]:
    return {"text": plain(label, OPTION_TEXT), "value": value}


def _input(field: EditField) -> dict[str, Any]:
    """The Block Kit element for one argument, by kind."""
    element: dict[str, Any]
    if field.kind in ("integer", "number"):
        element = {"type": "number_input", "is_decimal_allowed": field.kind == "number"}
        if field.value:
            element["initial_value"] = field.value
    elif field.kind == "boolean" or (
        field.kind == "enum" and 0 < len(field.options) <= OPTIONS_LIMIT and all(0 < len(o) <= 150 for o in field.options)
    ):
        pairs = [(str(texts.EDIT_YES), "true"), (str(texts.EDIT_NO), "false")] if field.kind == "boolean" else []
        options = [_option(label, value) for label, value in pairs] or [_option(o, o) for o in field.options]
        element = {"type": "static_select", "options": options}
        chosen = next((o for o in options if o["value"] == field.value), None)
        if chosen is not None:
            element["initial_option"] = chosen
    else:
        element = {"type": "plain_text_input", "multiline": field.multiline, "max_length": INPUT_LIMIT}
        if field.value:
            element["initial_value"] = field.value
    return {**element, "action_id": ARG_INPUT}


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """A long reply as several messages, cut at line breaks where possible."""
    parts: list[str] = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        cut = cut if cut > limit // 2 else limit
        parts.append(text[:cut])
        text = text[cut:].lstrip("\n")
    parts.append(text)
    return parts
