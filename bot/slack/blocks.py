"""Block Kit rendering: the approval card, the reject-reason modal, and safe message text.

What belongs here: turning the platform-neutral `CardView` into Slack blocks, and nothing
else. Every value that came from the model or a user (arguments, reasons, outcomes) is shown
as plain text (`emoji: false`) or escaped mrkdwn, so it can neither ping `@channel`, hide a
link, nor change what the approver reads. Block Kit limits are enforced here even though the
card builder already cut the values: header <= 150, section text <= 3000, <= 10 fields of
<= 2000 per section, button text <= 75, <= 50 blocks per message.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime
from typing import Any

from bot.core import i18n, texts
from bot.core.cards import status_lines
from bot.core.channels import CardView
from bot.slack.events import APPROVE_ACTION, REASON_BLOCK, REASON_INPUT, REJECT_ACTION, REJECT_VIEW

HEADER_LIMIT = 150
TEXT_LIMIT = 3000
FIELD_LIMIT = 2000
FIELDS_PER_SECTION = 10
BUTTON_LIMIT = 75
MAX_BLOCKS = 50
MESSAGE_LIMIT = 39_000  # Slack truncates message text at 40,000 characters

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


def mention(user_id: str | None, fallback: str | None) -> str:
    """`<@U…>` for a Slack user id, else the escaped name."""
    if user_id and re.fullmatch(r"[UW][A-Z0-9]+", user_id):
        return f"<@{user_id}>"
    return escape(fallback or user_id or "?")


def _field_sections(card: CardView) -> list[dict[str, Any]]:
    """Arguments as a two-column table: the label in bold, the value exactly as frozen."""
    cells: list[dict[str, Any]] = []
    for field in card.fields:
        cells.append(mrkdwn(f"*{escape(field.label)}*", FIELD_LIMIT))
        cells.append(plain(field.value, FIELD_LIMIT))
    return [{"type": "section", "fields": cells[i : i + FIELDS_PER_SECTION]} for i in range(0, len(cells), FIELDS_PER_SECTION)]


def _status(card: CardView) -> list[str]:
    """The shared decision/outcome lines, as safe mrkdwn with the decider as a real mention."""
    shown = replace(
        card,
        decided_by=mention(card.decided_by_id, card.decided_by),
        reason=escape(card.reason) if card.reason else None,
        outcome=escape(card.outcome) if card.outcome else None,
    )
    return status_lines(shown)


def _status_block(card: CardView) -> dict[str, Any] | None:
    lines = _status(card)
    return {"type": "section", "text": mrkdwn("\n".join(lines))} if lines else None


def card_blocks(card: CardView) -> list[dict[str, Any]]:
    """The approval card in its requester's language; buttons only while it is pending."""
    with i18n.speaking(card.lang, card.tz):
        return _card_blocks(card)


def _card_blocks(card: CardView) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": plain(texts.CARD_TITLE, HEADER_LIMIT)},
        {"type": "section", "text": plain(card.summary)},
        {"type": "context", "elements": [mrkdwn(f"`{escape(card.tool)}` · {escape(card.approval_id)}")]},
        *_field_sections(card),
    ]
    if card.warnings:
        blocks.append({"type": "section", "text": plain("\n".join(f"⚠️ {w}" for w in card.warnings))})
    if card.preview:
        blocks.append({"type": "section", "text": plain("\n".join(f"• {p}" for p in card.preview))})
    requested = texts.CARD_REQUESTED_BY.format(who=mention(card.requester_id, card.requester))
    expires = texts.CARD_EXPIRES.format(at=slack_date(card.expires_at))
    blocks.append(
        {
            "type": "context",
            "elements": [
                mrkdwn(escape(texts.CARD_WHY.format(reason=texts.localize(card.rule)))),
                mrkdwn(f"{requested} · {expires}"),
            ],
        }
    )
    status = _status_block(card)
    if status is not None:
        blocks.append(status)
    if card.actionable:
        blocks.append(
            {
                "type": "actions",
                "block_id": f"chatops_decide:{card.approval_id}"[:255],
                "elements": [
                    _button(texts.APPROVE, APPROVE_ACTION, card.approval_id, "primary"),
                    _button(texts.REJECT, REJECT_ACTION, card.approval_id, "danger"),
                ],
            }
        )
    if len(blocks) > MAX_BLOCKS:  # cannot happen with a well-built card; keep the buttons and the status
        blocks = blocks[: MAX_BLOCKS - 2] + blocks[-2:]
    return blocks


def _button(label: str, action_id: str, approval_id: str, style: str) -> dict[str, Any]:
    return {
        "type": "button",
        "text": plain(label, BUTTON_LIMIT),
        "action_id": action_id,
        "value": approval_id[:2000],
        "style": style,
    }


def card_text(card: CardView) -> str:
    """The notification / screen-reader fallback for the card."""
    with i18n.speaking(card.lang, card.tz):
        lines = [escape(f"{texts.CARD_TITLE}: {card.summary}"), *_status(card)]
        return clip("\n".join(lines), TEXT_LIMIT)


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
