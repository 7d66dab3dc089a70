"""`CardView` -> Feishu card JSON 2.0, and the `card.action.trigger` callback answer.

The card shows what Slack's shows: summary, tool, every frozen argument, warnings and preview,
the rule, the requester, the expiry and, once decided, `bot.core.cards.status_lines`. While pending
it carries a form: an optional "reject reason" input plus Approve (primary) and Reject
(danger) submit buttons whose `behaviors` callback value is `{"action", "approval_id"}`; the
typed reason arrives as `action.form_value.reject_reason`.

Everything that came from users or the model is rendered as `plain_text`, never markdown, so
nobody can inject links or `<at id=all>` into a card. The only markdown is the requester line,
an `<at>` tag for a well-formed open_id. Feishu refuses cards over 30 KB: `render_card`
measures the JSON and cuts every value shorter (with a visible marker) until it fits.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bot.core import i18n, texts
from bot.core.approvals import DecisionOutcome
from bot.core.cards import cut, status_lines
from bot.core.channels import CardView

MAX_CARD_BYTES = 28 * 1024  # Feishu's limit is 30 KB; keep a margin for the request envelope
REASON_INPUT = "reject_reason"
_OPEN_ID = re.compile(r"ou_[0-9A-Za-z_-]{1,64}")
_SHRINK_STEPS = (None, 400, 200, 100, 40, 10)
_COLOURS = {
    "pending": "orange",
    "approved": "blue",
    "executing": "blue",
    "succeeded": "green",
    "rejected": "red",
    "failed": "red",
    "in_doubt": "carmine",
    "expired": "grey",
    "cancelled": "grey",
}
_TOASTS = {
    "approved": "success",
    "rejected": "info",
    "vote_recorded": "info",
    "already": "warning",
    "expired": "warning",
    "not_allowed": "error",
    "not_found": "error",
}


def _text(content: str) -> dict[str, Any]:
    return {"tag": "div", "text": {"tag": "plain_text", "content": str(content)}}


def _button(label: str, kind: str, verb: str, approval_id: str) -> dict[str, Any]:
    return {
        "tag": "column",
        "width": "auto",
        "elements": [
            {
                "tag": "button",
                "name": verb,
                "text": {"tag": "plain_text", "content": str(label)},
                "type": kind,
                "form_action_type": "submit",
                "behaviors": [{"type": "callback", "value": {"action": verb, "approval_id": approval_id}}],
            }
        ],
    }


def _decision_form(card: CardView) -> dict[str, Any]:
    return {
        "tag": "form",
        "name": "decision",
        "elements": [
            {
                "tag": "input",
                "name": REASON_INPUT,
                "required": False,
                "max_length": 500,
                "width": "fill",
                "placeholder": {"tag": "plain_text", "content": str(texts.REJECT_REASON_PROMPT)},
            },
            {
                "tag": "column_set",
                "horizontal_spacing": "8px",
                "columns": [
                    _button(texts.APPROVE, "primary", "approve", card.approval_id),
                    _button(texts.REJECT, "danger", "reject", card.approval_id),
                ],
            },
        ],
    }


def _requester(card: CardView) -> dict[str, Any]:
    if card.requester == card.requester_id and _OPEN_ID.fullmatch(card.requester_id):
        who = f"<at id={card.requester_id}></at>"
        return {"tag": "markdown", "content": texts.CARD_REQUESTED_BY.format(who=who)}
    return _text(texts.CARD_REQUESTED_BY.format(who=card.requester))


def _build(card: CardView, limit: int | None) -> dict[str, Any]:
    def short(value: str) -> str:
        return value if limit is None else cut(value, limit)

    elements: list[dict[str, Any]] = [_text(short(card.summary)), {"tag": "hr"}]
    elements += [_text(f"{short(field.label)}: {short(field.value)}") for field in card.fields]
    elements += [_text("⚠️ " + short(warning)) for warning in card.warnings]
    if card.preview:
        elements.append(_text("\n".join(short(line) for line in card.preview)))
    elements.append({"tag": "hr"})
    elements.append(_text(texts.CARD_WHY.format(reason=short(texts.localize(card.rule) or ""))))
    elements.append(_requester(card))
    elements.append(_text(texts.CARD_EXPIRES.format(at=texts.when(card.expires_at))))
    elements += [_text(short(line)) for line in status_lines(card)]
    if card.actionable:
        elements.append(_decision_form(card))
    return {
        "schema": "2.0",
        "config": {"update_multi": True, "summary": {"content": str(texts.CARD_TITLE)}},
        "header": {
            "title": {"tag": "plain_text", "content": str(texts.CARD_TITLE)},
            "subtitle": {"tag": "plain_text", "content": card.tool},
            "template": _COLOURS.get(card.status, "grey"),
        },
        "body": {"elements": elements},
    }


def card_size(card: dict[str, Any]) -> int:
    """Bytes of the card as sent (`content` is the JSON string, UTF-8)."""
    return len(json.dumps(card, ensure_ascii=False).encode("utf-8"))


def render_card(card: CardView) -> dict[str, Any]:
    """The card JSON 2.0 for `card` in its requester's language, guaranteed under `MAX_CARD_BYTES`."""
    for limit in _SHRINK_STEPS:
        with i18n.speaking(card.lang, card.tz):
            built = _build(card, limit)
        if card_size(built) <= MAX_CARD_BYTES:
            return built
    # Unreachable with `bot.core.cards.card_content`'s caps (10 fields, 5 warnings, 5 preview lines).
    raise ValueError(f"approval card {card.approval_id} cannot be made small enough")


def callback_response(outcome: DecisionOutcome) -> dict[str, Any]:
    """The answer to a click: a toast for the clicker, plus the current card (raw) if any.

    A refused click (not allowed) changes nothing, so it gets the toast only.
    """
    toast = {"type": _TOASTS.get(outcome.kind, "info"), "content": cut(str(outcome.message), 300)}
    response: dict[str, Any] = {"toast": toast}
    if outcome.card is not None and outcome.kind != "not_allowed":
        response["card"] = {"type": "raw", "data": render_card(outcome.card)}
    return response
