"""The App Home tab: `HomeView` -> a Block Kit `home` view, published with `views.publish`.

What belongs here: rendering a person's pending approvals (each as its card shows it, with
Approve/Reject buttons of the same action ids and values as the card's, so a click takes the
card's path: `Core.decide`) and their recent requests, and publishing it. Approve is offered only
where every argument is shown in full ("everything that will run is visible before the
decision"); a shortened one sends the person to the card. Values people or the model wrote are
plain text only.
Block Kit limit: 100 blocks in a home view.
"""

from __future__ import annotations

from typing import Any

from bot.core import i18n, texts
from bot.core.channels import CardView
from bot.core.home import HomeView
from bot.slack.blocks import BUTTON_LIMIT, HEADER_LIMIT, compact_fields, line_sections, mrkdwn, plain, slack_date
from bot.slack.events import APPROVE_ACTION, REJECT_ACTION, decide_block

HOME_BLOCKS = 100
HOME_FIELD_BLOCKS = 4  # an approval's arguments on the Home tab: packed, as on a card with many of them
HOME_CALLBACK = "chatops_home"
ASKED_LIMIT = 150
_RUN_WORDS = {
    "running": texts.RUN_RUNNING,
    "waiting": texts.RUN_WAITING,
    "done": texts.RUN_DONE,
    "failed": texts.RUN_FAILED,
    "cancelled": texts.RUN_CANCELLED,
}


def _button(label: str, action_id: str, approval_id: str, style: str) -> dict[str, Any]:
    return {"type": "button", "text": plain(label, BUTTON_LIMIT), "action_id": action_id, "value": approval_id, "style": style}


def _pending_blocks(view: HomeView, room: int) -> list[dict[str, Any]]:
    """The pending approvals, each as its card shows it (arguments, warnings, preview), in at most
    `room` blocks; those that do not fit are counted in one closing line."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": plain(texts.HOME_PENDING.format(count=len(view.pending)), HEADER_LIMIT)}
    ]
    if not view.pending:
        return [*blocks, {"type": "section", "text": plain(texts.HOME_PENDING_NONE)}]
    for shown, (card, role) in enumerate(view.pending):
        item = _pending_item(card, role)
        if len(blocks) + len(item) > room - 1:  # one kept for the line counting the rest
            more = texts.HOME_PENDING_MORE.format(count=len(view.pending) - shown)
            return [*blocks, {"type": "section", "text": plain(more)}]
        blocks += item
    return blocks


def _pending_item(card: CardView, role: str) -> list[dict[str, Any]]:
    """One pending approval: what its card shows. Approve is offered only when every value is shown
    here in full; otherwise the person is sent to the card, where "View full request" shows them."""
    role_word = texts.ROLE_REQUESTER if role == "requester" else texts.ROLE_APPROVER
    fields, shortened = compact_fields(card, HOME_FIELD_BLOCKS)
    buttons = [_button(texts.REJECT, REJECT_ACTION, card.approval_id, "danger")]
    if not shortened:
        buttons.insert(0, _button(texts.APPROVE, APPROVE_ACTION, card.approval_id, "primary"))
    return [
        {"type": "section", "text": plain(card.summary)},
        *fields,
        *([{"type": "section", "text": plain(texts.HOME_SHORTENED)}] if shortened else []),
        *line_sections(card.warnings, "⚠️ "),
        *line_sections(card.preview, "• "),
        {
            "type": "context",
            "elements": [
                plain(f"{card.tool} · {card.approval_id}"),
                mrkdwn(texts.HOME_ROLE.format(role=role_word, at=slack_date(card.expires_at))),
            ],
        },
        # The card's block id: clicks carry the revision, so an edit made meanwhile voids this button.
        {"type": "actions", "block_id": decide_block(card.approval_id, card.revision), "elements": buttons},
    ]


def _recent_blocks(view: HomeView) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "header", "text": plain(texts.HOME_RECENT, HEADER_LIMIT)}]
    if not view.recent:
        return [*blocks, {"type": "section", "text": plain(texts.HOME_RECENT_NONE)}]
    for run in view.recent:
        status = str(_RUN_WORDS.get(run.status, run.status))
        asked = run.asked if len(run.asked) <= ASKED_LIMIT else run.asked[:ASKED_LIMIT] + "…"
        blocks.append(
            {"type": "section", "text": plain(texts.HOME_RUN.format(at=texts.when(run.at), status=status, asked=asked))}
        )
    return blocks


def home_view(view: HomeView, notice: str | None = None) -> dict[str, Any]:
    """The `home` view for `views.publish`, in the person's language; `notice` answers their last click."""
    with i18n.speaking(view.user.lang, view.user.tz):
        blocks: list[dict[str, Any]] = []
        if notice:
            blocks.append({"type": "section", "block_id": "chatops_notice", "text": plain(notice)})
        recent = _recent_blocks(view)
        blocks += _pending_blocks(view, HOME_BLOCKS - len(blocks) - len(recent) - 1)
        blocks.append({"type": "divider"})
        blocks += recent
    return {"type": "home", "callback_id": HOME_CALLBACK, "blocks": blocks[:HOME_BLOCKS]}
