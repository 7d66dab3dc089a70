"""Builds the platform-neutral approval card from a stored approval.

The card's words come from code and the frozen arguments, never from the model's prose.
`card_content` stores the frozen call's raw values with the approval; `card_view` turns them
into display text through `bot.core.display` (nothing invisible, nothing forged, every value
complete) plus warning lines for whatever was neutralised. A `send_email` call is shown as the
recipients will read the mail. Renderers shorten values for the compact card with `shorten`
and show the complete values in the platform's full view (Slack modal, Feishu panel, terminal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from bot.core import i18n, texts
from bot.core.channels import CardField, CardView
from bot.core.display import Findings, one_line, show
from bot.core.events import Thread
from storage.engine import Database
from storage.models import Approval
from tools.email import as_received

SUMMARY_LIMIT = 500
PREVIEW_LIMIT = 300
FIELD_WARNINGS = 12  # warning lines about neutralised argument values on a card; more are counted
STORED_LINES = 40  # warnings or preview lines kept with a card (an MCP preview has at most 22); more are counted
OUTCOME_LIMIT = 600
MULTILINE_NAMES = frozenset({"body", "text", "message", "content", "description", "notes", "note", "comment", "details"})
GUTTER = "│ "
CONTINUED = "↪ "
_MARKER_START = re.compile(r"⟨[^⟩]*$")


def cut(text: str, limit: int) -> str:
    """`text` (rendered in the current language) if short enough, else its start plus a marker saying how
    much was cut (for non-argument text)."""
    text = str(text)
    if len(text) <= limit:
        return text
    marker = texts.CARD_TRUNCATED.format(more=len(text) - limit)
    return text[: max(0, limit)] + marker


def shorten(shown: str, limit: int) -> tuple[str, bool]:
    """A display value cut to about `limit` characters (never inside a `⟨…⟩` marker) and whether it was cut."""
    if len(shown) <= limit:
        return shown, False
    head = shown[: max(0, limit)]
    if (partial := _MARKER_START.search(head)) is not None:
        head = head[: partial.start()]
    return head + texts.CARD_SHORTENED.format(more=len(shown) - len(head)), True


def quoted(shown: str) -> str:
    """A multi-line value with a gutter on every line, so none of its lines can pass for a card line."""
    return "\n".join(GUTTER + line for line in shown.split("\n"))


def _safe_cut(text: str, limit: int) -> int:
    """A cut position <= limit outside any `⟨…⟩` marker and not next to blank space (platforms trim it)."""
    cut = limit
    if (partial := _MARKER_START.search(text, 0, cut)) is not None and partial.start() > 0:
        cut = partial.start()
    while cut > 1 and (text[cut - 1].isspace() or text[cut].isspace()):
        cut -= 1
    return cut if cut > 1 else limit


def chunks(text: str, limit: int) -> list[str]:
    """`text` over several blocks: split at line breaks where possible, else mid-line with a `↪ ` lead.

    Joining them back: a piece starting with `↪ ` continues the previous line, any other follows a line break.
    """
    pieces: list[str] = []
    while len(text) > limit:
        newline = text.rfind("\n", 0, limit + 1)
        if newline > limit // 2:
            pieces.append(text[:newline])
            text = text[newline + 1 :]
            continue
        cut = _safe_cut(text, limit - len(CONTINUED))
        pieces.append(text[:cut])
        text = CONTINUED + text[cut:]
    pieces.append(text)
    return pieces


def _kept_lines(lines: list[str]) -> list[str]:
    """Lines to store with a card: all of them, or, past `STORED_LINES`, the first ones and a line
    saying how many more there were (in the requester's language, current while the run proposes)."""
    kept = [i18n.localised(line)[:2000] for line in lines]
    if len(kept) <= STORED_LINES:
        return kept
    return [*kept[: STORED_LINES - 1], str(texts.CARD_MORE_LINES.format(count=len(kept) - STORED_LINES + 1))]


def card_content(
    summary: str, args: dict[str, Any], warnings: list[str], preview: list[str], reason: str, *, nulls: bool = False
) -> dict[str, Any]:
    """The frozen part of a card, stored with the approval when it is created: raw values, shown by
    `card_view`; the tool's summary and preview lines rendered in the current language (the requester's,
    while the run proposes). `nulls`: the tool receives a null argument as such (MCP), so the card shows it."""
    content: dict[str, Any] = {
        "layout": 2,
        "summary": i18n.localised(summary)[:5000],
        "args": args,
        "warnings": _kept_lines(warnings),
        "preview": _kept_lines(preview),
        "reason": reason[:2000],
    }
    if nulls:
        content["nulls"] = True
    return content


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _generic(args: dict[str, Any], nulls: bool = False) -> list[tuple[str, str, bool]]:
    """(label, raw text, multi-line) for every argument that reaches the tool (a null one too when `nulls`)."""
    fields = []
    for name, value in args.items():
        if value is None and not nulls:
            continue
        if isinstance(value, str):
            fields.append((name, value, name.lower() in MULTILINE_NAMES))
        else:
            fields.append((name, _json(value), False))
    return fields


def _mail(args: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """A `send_email` call as the mail its recipients will get (the args stay the source of truth)."""
    return [(label, value, label == "Body") for label, value in as_received(args).items()]


PRESENTERS: dict[str, Callable[[dict[str, Any]], list[tuple[str, str, bool]]]] = {"send_email": _mail}


def _raw_fields(tool: str, args: dict[str, Any], nulls: bool = False) -> list[tuple[str, str, bool]]:
    presenter = PRESENTERS.get(tool)
    if presenter is not None:
        try:
            return presenter(args)
        except Exception:  # noqa: BLE001 - unusual values: show the arguments themselves
            pass
    return _generic(args, nulls)


def _codes(codes: set[str]) -> str:
    listed = sorted(codes)
    more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
    return ", ".join(listed[:5]) + more


def _warnings(label: str, found: Findings, newlines: bool) -> list[str]:
    lines = []
    if found.bidi:
        lines.append(texts.CARD_WARN_BIDI.format(field=label, codes=_codes(found.bidi)))
    if found.invisible:
        lines.append(texts.CARD_WARN_INVISIBLE.format(field=label, codes=_codes(found.invisible)))
    if found.collapsed:
        lines.append(texts.CARD_WARN_BLANKS.format(field=label))
    if newlines:
        lines.append(texts.CARD_WARN_NEWLINES.format(field=label))
    lines += [texts.CARD_WARN_DOMAIN.format(field=label, detail=d) for d in found.domains]
    return lines


def shown_fields(tool: str, args: dict[str, Any], nulls: bool = False) -> tuple[tuple[CardField, ...], list[str]]:
    """Every argument as display text, complete, and the warnings about what was neutralised: up to
    `FIELD_WARNINGS` lines, then one counting the rest (every value still shows its own markers; a
    warning per argument of thousands would make a card no platform accepts)."""
    fields, warnings = [], []
    for label, raw, multiline in _raw_fields(tool, args, nulls):
        found = Findings()
        value = show(raw, one_line=not multiline, found=found)
        shown_label = one_line(label)
        fields.append(CardField(shown_label, value, multiline))
        warnings += _warnings(shown_label, found, not multiline and "\n" in raw)
    if len(warnings) > FIELD_WARNINGS:
        more = len(warnings) - FIELD_WARNINGS + 1
        warnings = [*warnings[: FIELD_WARNINGS - 1], texts.CARD_MORE_WARNINGS.format(count=more)]
    return tuple(fields), warnings


def _legacy_fields(content: dict[str, Any]) -> tuple[tuple[CardField, ...], list[str]]:
    """Cards stored before layout 2 kept pre-cut values: show them neutralised."""
    fields = tuple(CardField(one_line(f["label"]), one_line(f["value"])) for f in content.get("fields", []))
    return fields, []


def _headline(outcome: str) -> str:
    """A tool result as people read it on the card: its `message` when it has one (the model gets it all)."""
    try:
        parsed = json.loads(outcome)
    except ValueError:
        return outcome
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return message if isinstance(message, str) else outcome


def _line(text: str, limit: int) -> str:
    return shorten(one_line(text), limit)[0]


def card_view(approval: Approval) -> CardView:
    """The card as it should look now, from the approval row."""
    content = approval.card or {}
    if "args" in content:
        fields, notices = shown_fields(approval.tool_name, content["args"], bool(content.get("nulls")))
    else:
        fields, notices = _legacy_fields(content)
    votes = tuple(one_line(v.get("name") or v.get("id", "?")) for v in (approval.votes or []))
    requester = (approval.requester or {}).get("name") or approval.requester_id
    return CardView(
        approval_id=approval.id,
        tool=one_line(approval.tool_name),
        summary=_line(content.get("summary", approval.tool_name), SUMMARY_LIMIT),
        fields=fields,
        requester=one_line(requester),
        requester_id=(approval.requester or {}).get("id", approval.requester_id),
        expires_at=approval.expires_at,
        status=approval.status,
        rule=_line(content.get("reason", approval.rule), PREVIEW_LIMIT),
        warnings=tuple(notices + [_line(w, PREVIEW_LIMIT) for w in content.get("warnings", [])]),
        preview=tuple(_line(p, PREVIEW_LIMIT) for p in content.get("preview", [])),
        decided_by=one_line(approval.decided_by_name) if approval.decided_by_name else None,
        decided_by_id=approval.decided_by,
        decided_at=approval.decided_at,
        reason=_line(approval.decision_reason, PREVIEW_LIMIT) if approval.decision_reason else None,
        outcome=_line(_headline(approval.outcome), OUTCOME_LIMIT) if approval.outcome else None,
        votes=votes,
        lang=(approval.requester or {}).get("lang"),
        tz=(approval.requester or {}).get("tz"),
        revision=approval.revision or 1,
        edited_by=tuple(dict.fromkeys(one_line(_editor(e)) for e in approval.edits or [])),
    )


def _editor(edit: dict[str, Any]) -> str:
    user = edit.get("user") or {}
    return str(user.get("name") or user.get("id") or "?")


async def load_card(db: Database, approval_id: str) -> tuple[CardView, Thread] | None:
    """The current card of an approval and where it was posted (for a full view), or None if unknown."""
    if not approval_id or len(approval_id) > 40 or "\x00" in approval_id:
        return None
    async with db.transaction(urgent=True) as session:
        approval = await session.get(Approval, approval_id)
        if approval is None:
            return None
        return card_view(approval), Thread.from_dict(approval.thread)


def status_lines(card: CardView) -> list[str]:
    """The decision and outcome lines every renderer shows under a decided card, in the current
    language (renderers call this inside `i18n.speaking(card.lang, card.tz)`)."""
    lines: list[str] = []
    if card.edited_by:
        lines.append(texts.CARD_EDITED.format(who=", ".join(card.edited_by), revision=card.revision))
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
        lines.append(texts.CARD_SUCCEEDED.format(detail=texts.localize(card.outcome) or "ok"))
    if card.status == "failed":
        lines.append(texts.CARD_FAILED.format(detail=texts.localize(card.outcome) or "error"))
    if card.status == "in_doubt":
        lines.append(texts.CARD_IN_DOUBT.format(detail=texts.localize(card.outcome) or "interrupted"))
    return lines
