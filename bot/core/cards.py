"""Builds the platform-neutral approval card from a stored approval.

The card's words come from code and the frozen arguments, never from the model's prose.
Every value is cut to a bounded length with a visible marker, so any platform's limits hold.
"""

from __future__ import annotations

import json
from typing import Any

from bot.core import texts
from bot.core.channels import CardField, CardView
from storage.models import Approval

FIELD_LIMIT = 600
MAX_FIELDS = 10
SUMMARY_LIMIT = 500
PREVIEW_LIMIT = 300


def cut(text: str, limit: int) -> str:
    """`text` (rendered in the current language) if short enough, else its start plus a marker saying how much was cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    marker = texts.CARD_TRUNCATED.format(more=len(text) - limit)
    return text[: max(0, limit)] + marker


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def card_content(summary: str, args: dict[str, Any], warnings: list[str], preview: list[str], reason: str) -> dict[str, Any]:
    """The frozen part of a card, stored with the approval when it is created."""
    shown = [(k, v) for k, v in args.items() if v is not None]
    fields = [{"label": k, "value": cut(_show(v), FIELD_LIMIT)} for k, v in shown[:MAX_FIELDS]]
    if len(shown) > MAX_FIELDS:
        rest = {k: v for k, v in shown[MAX_FIELDS:]}
        fields[-1] = {"label": "more arguments", "value": cut(_show(rest), FIELD_LIMIT)}
    return {
        "summary": cut(summary, SUMMARY_LIMIT),
        "fields": fields,
        "warnings": [cut(w, PREVIEW_LIMIT) for w in warnings][:5],
        "preview": [cut(p, PREVIEW_LIMIT) for p in preview][:5],
        "reason": cut(reason, PREVIEW_LIMIT),
    }


def _headline(outcome: str) -> str:
    """A tool result as people read it on the card: its `message` when it has one (the model gets it all)."""
    try:
        parsed = json.loads(outcome)
    except ValueError:
        return outcome
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return parsed["message"]
    return outcome


def card_view(approval: Approval) -> CardView:
    """The card as it should look now, from the approval row."""
    content = approval.card or {}
    votes = tuple(v.get("name") or v.get("id", "?") for v in (approval.votes or []))
    return CardView(
        approval_id=approval.id,
        tool=approval.tool_name,
        summary=content.get("summary", approval.tool_name),
        fields=tuple(CardField(f["label"], f["value"]) for f in content.get("fields", [])),
        requester=(approval.requester or {}).get("name") or approval.requester_id,
        requester_id=(approval.requester or {}).get("id", approval.requester_id),
        expires_at=approval.expires_at,
        status=approval.status,
        rule=content.get("reason", approval.rule),
        warnings=tuple(content.get("warnings", [])),
        preview=tuple(content.get("preview", [])),
        decided_by=approval.decided_by_name,
        decided_by_id=approval.decided_by,
        decided_at=approval.decided_at,
        reason=approval.decision_reason,
        outcome=cut(_headline(approval.outcome), FIELD_LIMIT) if approval.outcome else None,
        votes=votes,
        lang=(approval.requester or {}).get("lang"),
        tz=(approval.requester or {}).get("tz"),
    )


def status_lines(card: CardView) -> list[str]:
    """The decision and outcome lines every renderer shows under a decided card, in the current
    language (renderers call this inside `i18n.speaking(card.lang, card.tz)`)."""
    lines: list[str] = []
    who = card.decided_by or "?"
    at = texts.when(card.decided_at) if card.decided_at else "?"
    reason = texts.localize(card.reason)
    if card.status == "pending" and card.votes:
        lines.append(texts.CARD_VOTE_RECORDED.format(remaining=1))
    if card.status in ("approved", "executing", "succeeded", "failed", "in_doubt"):
        lines.append(texts.CARD_APPROVED.format(who=who, at=at))
    if card.status == "rejected":
        lines.append(
            texts.CARD_REJECTED.format(who=who, reason=reason) if reason else texts.CARD_REJECTED_NO_REASON.format(who=who)
        )
    if card.status == "expired":
        lines.append(texts.CARD_EXPIRED.format(at=texts.when(card.expires_at)))
    if card.status == "cancelled":
        lines.append(texts.CARD_CANCELLED.format(reason=reason or "-"))
    if card.status == "executing":
        lines.append(str(texts.CARD_EXECUTING))
    if card.status == "succeeded":
        lines.append(texts.CARD_SUCCEEDED.format(detail=card.outcome or "ok"))
    if card.status == "failed":
        lines.append(texts.CARD_FAILED.format(detail=card.outcome or "error"))
    if card.status == "in_doubt":
        lines.append(texts.CARD_IN_DOUBT.format(detail=card.outcome or "interrupted"))
    return lines
