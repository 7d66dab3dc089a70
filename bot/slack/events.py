"""Slack payloads -> our small event types. Pure functions: no I/O, no Bolt, no core calls.

What belongs here: deciding which Slack events are messages for the bot (and which are noise:
our own posts, other bots, edits, channel chatter without a mention), stripping the bot's
mention, choosing the conversation and the reply coordinates, the dedupe keys, and reading the
clicker, the approval id and the card's revision (in the buttons' `block_id`) out of
`block_actions` / `view_submission` payloads, and the typed values out of a submitted Edit modal.

The conversation rule (documented in the README, section Slack):
- in a channel the bot only hears `app_mention`; the conversation is the thread of the mention
  (`thread_ts or ts`) and every reply goes into that thread; a follow-up needs a new mention;
- in a DM every plain message counts; top-level DM messages form one conversation per DM and
  are answered top-level; a message inside a DM thread belongs to (and is answered in) that thread.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bot.core.events import DecisionRequest, EditRequest, IncomingMessage, Thread, User, card_revision

PLATFORM = "slack"
APPROVE_ACTION = "chatops_approve"
REJECT_ACTION = "chatops_reject"
REJECT_VIEW = "chatops_reject_reason"
VIEW_ACTION = "chatops_view_full"
EDIT_ACTION = "chatops_edit"
EDIT_VIEW = "chatops_edit_form"
DECIDE_BLOCK = "chatops_decide"  # the card's buttons: `chatops_decide:<approval id>@<revision>`
ARG_BLOCK = "arg:"  # an Edit modal input: `arg:<argument name>`, its element's action_id `value`
ARG_INPUT = "value"
FULL_VIEW = "chatops_full_request"
REASON_BLOCK = "reason"
REASON_INPUT = "reason"

# Message subtypes that are still a person talking (everything else is an edit, a join, a bot...).
_HUMAN_SUBTYPES = frozenset({"file_share", "thread_broadcast"})


@dataclass(frozen=True)
class Author:
    """What we could learn about a message's author beyond the payload (users.info), if anything."""

    name: str | None = None
    is_bot: bool = False
    groups: tuple[str, ...] = ()  # `slack-group:<id>` entries of the policy the author is a member of
    locale: str | None = None  # `users.info` with `include_locale` (e.g. "zh-CN")
    tz: str | None = None  # e.g. "Asia/Shanghai"


def mention_pattern(bot_user_id: str) -> re.Pattern[str]:
    """`<@UBOT>` and `<@UBOT|name>` as Slack writes a mention of the bot."""
    return re.compile(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>")


def strip_mention(text: str, bot_user_id: str | None) -> str:
    """The text with every mention of the bot removed and the whitespace tidied."""
    if bot_user_id:
        text = mention_pattern(bot_user_id).sub(" ", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def team_of(body: dict[str, Any]) -> str:
    """The workspace the event was delivered for (one app install = one team)."""
    team = body.get("team_id") or (body.get("team") or {}).get("id") or body.get("event", {}).get("team")
    return str(team or "-")


def author_id(event: dict[str, Any]) -> str | None:
    """The human author of a message event, or None when it is not a person's message."""
    if event.get("bot_id") or event.get("bot_profile"):
        return None
    subtype = event.get("subtype")
    if subtype is not None and subtype not in _HUMAN_SUBTYPES:
        return None
    user = event.get("user")
    return str(user) if user else None


def is_for_bot(event: dict[str, Any], bot_user_id: str | None) -> bool:
    """An `app_mention` anywhere, or a DM; never our own message nor another bot's."""
    user = author_id(event)
    if user is None or (bot_user_id is not None and user == bot_user_id):
        return False
    if event.get("type") == "app_mention":
        return True
    return event.get("type") == "message" and event.get("channel_type") == "im"


def dedupe_keys(body: dict[str, Any], event: dict[str, Any]) -> tuple[str, ...]:
    """The delivery (`event_id`) and the message itself (one message can arrive as two events)."""
    keys = [f"slack:msg:{team_of(body)}:{event.get('channel')}:{event.get('ts')}"]
    if body.get("event_id"):
        keys.insert(0, f"slack:evt:{body['event_id']}")
    return tuple(keys)


def thread_for(body: dict[str, Any], event: dict[str, Any]) -> tuple[Thread, str]:
    """Where to answer (coordinates stored with the run) and the conversation key."""
    team, channel, ts = team_of(body), str(event.get("channel")), str(event.get("ts"))
    in_dm = event.get("channel_type") == "im"
    thread_ts = event.get("thread_ts") or (None if in_dm else ts)
    coords = {"team": team, "channel": channel, "thread_ts": thread_ts, "ts": ts, "dm": in_dm, "user": event.get("user")}
    key = f"slack:{team}:{channel}:{thread_ts}" if thread_ts else f"slack:{team}:{channel}"
    return Thread(PLATFORM, coords), key


def message_from_event(
    body: dict[str, Any], event: dict[str, Any], bot_user_id: str | None, author: Author | None = None
) -> IncomingMessage | None:
    """The message for the core, or None when the event is not addressed to the bot."""
    if not is_for_bot(event, bot_user_id):
        return None
    user_id = str(author_id(event))
    who = author or Author()
    tenant = event.get("user_team") or event.get("team") or team_of(body)
    user = User(PLATFORM, user_id, tenant=str(tenant), name=who.name, is_bot=who.is_bot, groups=who.groups)
    thread, key = thread_for(body, event)
    return IncomingMessage(
        user=user,
        text=strip_mention(str(event.get("text") or ""), bot_user_id),
        thread=thread,
        conversation_key=key,
        dedupe_keys=dedupe_keys(body, event),
        channel_id=str(event.get("channel")),
    )


def clicker(body: dict[str, Any]) -> User:
    """The person who clicked or submitted (ids only decide; the name is for display)."""
    user = body.get("user") or {}
    tenant = user.get("team_id") or team_of(body)
    name = user.get("name") or user.get("username")
    return User(PLATFORM, str(user.get("id")), tenant=str(tenant), name=name)


def decide_block(approval_id: str, revision: int) -> str:
    return f"{DECIDE_BLOCK}:{approval_id}@{revision}"[:255]


def revision_of(action: dict[str, Any]) -> int:
    """The revision of the call the clicked card showed (a card posted before edits existed: 1)."""
    block = str(action.get("block_id") or "")
    head, _, revision = block.rpartition("@")
    return card_revision(revision) if head.startswith(DECIDE_BLOCK + ":") else 1


def decision_from_action(body: dict[str, Any], action: dict[str, Any]) -> DecisionRequest:
    """An Approve click (the button's value is the approval id, its block the card's revision)."""
    return DecisionRequest(
        approval_id=str(action.get("value") or ""), user=clicker(body), approve=True, revision=revision_of(action)
    )


def edit_from_action(body: dict[str, Any], action: dict[str, Any]) -> EditRequest:
    """An Edit click: which approval, which revision of it, who."""
    return EditRequest(approval_id=str(action.get("value") or ""), user=clicker(body), revision=revision_of(action))


def _typed(element: dict[str, Any]) -> Any:
    if "selected_option" in element:
        return (element.get("selected_option") or {}).get("value")
    return element.get("value")


def edit_from_view(body: dict[str, Any]) -> tuple[EditRequest, dict[str, Any]]:
    """A submitted Edit modal: the typed values by argument name, and the place stored in the modal."""
    view = body.get("view") or {}
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except json.JSONDecodeError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    values: dict[str, Any] = {}
    for block_id, inputs in ((view.get("state") or {}).get("values") or {}).items():
        element = inputs.get(ARG_INPUT) if isinstance(inputs, dict) else None
        if str(block_id).startswith(ARG_BLOCK) and isinstance(element, dict):
            values[str(block_id)[len(ARG_BLOCK) :]] = _typed(element)
    revision = card_revision(meta.get("revision"))
    request = EditRequest(str(meta.get("approval_id") or ""), clicker(body), revision, values)
    return request, meta


def click_place(body: dict[str, Any]) -> dict[str, str | None]:
    """Where the clicked card lives: channel and thread, for ephemeral answers and the modal."""
    message = body.get("message") or {}
    container = body.get("container") or {}
    channel = (body.get("channel") or {}).get("id") or container.get("channel_id")
    return {"channel": channel, "thread_ts": message.get("thread_ts") or container.get("thread_ts")}


def copy_url(body: dict[str, Any]) -> str | None:
    """The `response_url` of a click made on a private copy of a card (an ephemeral message, as
    `pending` posts them): the only way to change that copy. None for a click on a shared card."""
    if not (body.get("container") or {}).get("is_ephemeral"):
        return None
    url = body.get("response_url")
    return url if isinstance(url, str) and url else None


def from_home(body: dict[str, Any]) -> bool:
    """Was this click made on the App Home tab (not on a card in a conversation)?"""
    view = body.get("view") or {}
    return (body.get("container") or {}).get("type") == "view" and view.get("type") == "home"


def command_place(body: dict[str, Any]) -> tuple[User, str, str | None]:
    """A `/chatops` slash command: the caller, the channel, and the conversation when it is a
    DM's top level (a slash command carries no thread, so elsewhere it names no conversation)."""
    team = str(body.get("team_id") or "-")
    user = User(PLATFORM, str(body.get("user_id")), tenant=team, name=body.get("user_name"))
    channel = str(body.get("channel_id") or "")
    key = f"slack:{team}:{channel}" if channel.startswith("D") else None
    return user, channel, key


def decision_from_view(body: dict[str, Any]) -> tuple[DecisionRequest, dict[str, Any]]:
    """A submitted reject-reason modal: the decision, and the place stored in the modal."""
    view = body.get("view") or {}
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except json.JSONDecodeError:
        meta = {}
    values = (view.get("state") or {}).get("values") or {}
    reason = ((values.get(REASON_BLOCK) or {}).get(REASON_INPUT) or {}).get("value")
    reason = reason.strip() if isinstance(reason, str) else None
    request = DecisionRequest(
        approval_id=str(meta.get("approval_id") or ""),
        user=clicker(body),
        approve=False,
        reason=reason or None,
        revision=card_revision(meta.get("revision")),
    )
    return request, meta
