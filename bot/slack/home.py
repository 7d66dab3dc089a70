"""The App Home tab: `HomeView` -> a Block Kit `home` view, published with `views.publish`.

What belongs here: rendering a person's pending approvals (Approve/Reject buttons with the same
action ids and values as the card's, so a click takes the card's path: `Core.decide`) and their
recent requests, and publishing it. Values people or the model wrote are plain text only.
Block Kit limit: 100 blocks in a home view.
"""

from __future__ import annotations

from typing import Any

from bot.core import i18n, texts
from bot.core.home import HomeView
from bot.slack.blocks import BUTTON_LIMIT, HEADER_LIMIT, mrkdwn, plain, slack_date
from bot.slack.events import APPROVE_ACTION, REJECT_ACTION, decide_block

HOME_BLOCKS = 100
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


def _pending_blocks(view: HomeView) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": plain(texts.HOME_PENDING.format(count=len(view.pending)), HEADER_LIMIT)}
    ]
    if not view.pending:
        return [*blocks, {"type": "section", "text": plain(texts.HOME_PENDING_NONE)}]
    for card, role in view.pending:
        role_word = texts.ROLE_REQUESTER if role == "requester" else texts.ROLE_APPROVER
        blocks += [
            {"type": "section", "text": plain(card.summary)},
            {
                "type": "context",
                "elements": [
                    plain(f"{card.tool} · {card.approval_id}"),
                    mrkdwn(texts.HOME_ROLE.format(role=role_word, at=slack_date(card.expires_at))),
                ],
            },
            {
                "type": "actions",
                "block_id": decide_block(card.approval_id, card.revision),  # the card's: clicks carry the revision
                "elements": [
                    _button(texts.APPROVE, APPROVE_ACTION, card.approval_id, "primary"),
                    _button(texts.REJECT, REJECT_ACTION, card.approval_id, "danger"),
                ],
            },
        ]
    return blocks


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
        blocks += _pending_blocks(view)
        blocks.append({"type": "divider"})
        blocks += _recent_blocks(view)
    return {"type": "home", "callback_id": HOME_CALLBACK, "blocks": blocks[:HOME_BLOCKS]}
