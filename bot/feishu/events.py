"""Feishu payloads (plain decrypted JSON) -> our `IncomingMessage`, `DecisionRequest` and `EditRequest`.

Pure functions, no SDK types, no I/O: both transports (webhook and long connection) hand the
same JSON here. `to_message` returns None for a message the bot must ignore (a bot sender, a
group message that does not @mention the bot); `BadPayload` means the JSON is not a usable
event. `@_all` never counts as mentioning the bot. A card button's callback value is
`{"action", "approval_id", "revision"}` (`revision` missing on cards posted before edits: 1);
`card_verb` says which button it was (approve, reject, edit, edit_submit, edit_cancel).
"""

from __future__ import annotations

import json
import re
from typing import Any

from bot.core.events import DecisionRequest, EditRequest, IncomingMessage, Thread, User, card_revision

PLATFORM = "feishu"
REASON_LIMIT = 500
EDIT_VERBS = ("edit", "edit_submit", "edit_cancel")
ARG_INPUT = "arg_"  # an edit form input: `arg_<index>`; the submit button's value lists the names in order
_MENTION_KEY = re.compile(r"@_(?:user_\d+|all)")


class BadPayload(ValueError):
    """The payload is authentic but not an event we can read (missing ids, wrong shapes)."""


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def event_type(payload: dict[str, Any]) -> str | None:
    """`header.event_type` of a 2.0 event; legacy card callbacks have none."""
    return _str(_obj(payload.get("header")).get("event_type"))


def is_direct(payload: dict[str, Any]) -> bool:
    """Whether a message event comes from a one-to-one chat (every message there counts)."""
    return _obj(_obj(payload.get("event")).get("message")).get("chat_type") == "p2p"


def _post_text(content: dict[str, Any]) -> str:
    """Flatten a `post` message: title plus paragraphs; `at` nodes keep their mention key."""
    body = content if "content" in content else next(iter(content.values()), {})
    body = _obj(body)
    lines = [str(body["title"])] if _str(body.get("title")) else []
    for paragraph in body.get("content") or []:
        parts: list[str] = []
        for node in paragraph if isinstance(paragraph, list) else []:
            node = _obj(node)
            if node.get("tag") == "at":
                key = _str(node.get("user_id")) or ""
                shown = key if key.startswith("@_") else "@" + str(node.get("user_name") or "")
                parts.append(shown)
            elif isinstance(node.get("text"), str):
                parts.append(node["text"])
        lines.append("".join(parts))
    return "\n".join(lines)


def _raw_text(message: dict[str, Any]) -> str:
    try:
        content = _obj(json.loads(message.get("content") or "{}"))
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise BadPayload("message content is not JSON") from None
    kind = message.get("message_type")
    if kind == "text":
        return str(content.get("text") or "")
    if kind == "post":
        return _post_text(content)
    return ""  # images, files, stickers...: the core answers an empty message with help


def _readable(text: str, mentions: list[dict[str, Any]], bot_open_id: str | None) -> tuple[str, bool]:
    """Replace mention placeholders; returns (text, bot_was_mentioned)."""
    names: dict[str, str] = {"@_all": "@all"}
    mentioned = False
    for mention in mentions:
        key = _str(mention.get("key"))
        if key is None:
            continue
        open_id = _obj(mention.get("id")).get("open_id")
        if bot_open_id is not None and open_id == bot_open_id:
            names[key] = ""
            mentioned = True
        else:
            names[key] = "@" + (_str(mention.get("name")) or "someone")
    text = _MENTION_KEY.sub(lambda m: names.get(m.group(0), m.group(0)), text)
    text = "\n".join(" ".join(line.split()) for line in text.strip().splitlines())
    return text.strip(), mentioned


def to_message(payload: dict[str, Any], *, bot_open_id: str | None) -> IncomingMessage | None:
    """An `im.message.receive_v1` event as an `IncomingMessage`, or None if not for the bot."""
    header = _obj(payload.get("header"))
    event = _obj(payload.get("event"))
    sender = _obj(event.get("sender"))
    message = _obj(event.get("message"))
    if sender.get("sender_type") != "user":
        return None  # other bots and the app itself never start a run
    open_id = _str(_obj(sender.get("sender_id")).get("open_id"))
    message_id = _str(message.get("message_id"))
    chat_id = _str(message.get("chat_id"))
    if open_id is None or message_id is None or chat_id is None:
        raise BadPayload("message event without sender, message or chat id")
    tenant = _str(sender.get("tenant_key")) or _str(header.get("tenant_key"))
    mentions = [_obj(m) for m in message.get("mentions") or [] if isinstance(m, dict)]
    text, mentioned = _readable(_raw_text(message), mentions, bot_open_id)
    is_dm = is_direct(payload)
    if not is_dm and not mentioned:
        return None
    root_id = _str(message.get("root_id")) or message_id
    coords = {"chat_id": chat_id, "message_id": message_id, "in_thread": not is_dm}
    if is_dm:
        conversation = f"{PLATFORM}:{tenant or '-'}:{chat_id}"
    else:
        coords["root_id"] = root_id
        conversation = f"{PLATFORM}:{tenant or '-'}:{chat_id}:{root_id}"
    keys = [f"feishu:msg:{message_id}"]
    if event_id := _str(header.get("event_id")):
        keys.insert(0, f"feishu:evt:{event_id}")
    return IncomingMessage(
        user=User(platform=PLATFORM, id=open_id, tenant=tenant),
        text=text,
        thread=Thread(platform=PLATFORM, coords=coords),
        conversation_key=conversation,
        dedupe_keys=tuple(keys),
        channel_id=chat_id,
    )


def click_chat(payload: dict[str, Any]) -> str | None:
    """The chat a card click happened in (`context.open_chat_id`), when Feishu says."""
    event = _obj(payload.get("event")) if "event" in payload else payload
    return _str(_obj(event.get("context")).get("open_chat_id")) or _str(event.get("open_chat_id"))


def to_menu(payload: dict[str, Any]) -> tuple[User, str]:
    """An `application.bot.menu_v6` event: (the person who clicked the menu, the entry's `event_key`)."""
    header = _obj(payload.get("header"))
    event = _obj(payload.get("event"))
    operator = _obj(event.get("operator"))
    open_id = _str(_obj(operator.get("operator_id")).get("open_id"))
    key = _str(event.get("event_key"))
    if open_id is None or key is None:
        raise BadPayload("bot menu event without operator or event_key")
    tenant = _str(header.get("tenant_key")) or _str(operator.get("tenant_key"))
    return User(platform=PLATFORM, id=open_id, tenant=tenant, name=_str(operator.get("operator_name"))), key


def _card_event(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(event, action, action value) of a card callback."""
    event = _obj(payload.get("event")) if "event" in payload else payload
    action = _obj(event.get("action"))
    return event, action, _obj(action.get("value"))


def is_click(payload: dict[str, Any]) -> bool:
    """A card's button or form (a callback, not an event Feishu delivers again)."""
    kind = event_type(payload)
    return kind == "card.action.trigger" or (kind is None and "action" in payload)


def clicker_open_id(payload: dict[str, Any]) -> str | None:
    """Who clicked a card (the operator's open_id), or None when the payload does not say."""
    event = _obj(payload.get("event")) if "event" in payload else payload
    return _str(_obj(event.get("operator")).get("open_id")) or _str(event.get("open_id"))


def card_verb(payload: dict[str, Any]) -> str | None:
    """Which card button was clicked (`approve`, `reject`, `edit`, `edit_submit`, `edit_cancel`), if it says."""
    verb = _card_event(payload)[2].get("action")
    return verb if isinstance(verb, str) else None


def to_edit(payload: dict[str, Any]) -> tuple[str, EditRequest]:
    """An Edit, Save or Cancel click of the edit form: (verb, request); Save carries the typed values."""
    _, action, value = _card_event(payload)
    decision = to_decision(payload)
    verb = str(value.get("action"))
    values: dict[str, Any] | None = None
    if verb == "edit_submit":
        names = value.get("fields")
        form = _obj(action.get("form_value"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadPayload("edit form without its field names")
        values = {name: form[f"{ARG_INPUT}{i}"] for i, name in enumerate(names) if f"{ARG_INPUT}{i}" in form}
    return verb, EditRequest(decision.approval_id, decision.user, decision.revision, values)


def to_decision(payload: dict[str, Any]) -> DecisionRequest:
    """A `card.action.trigger` callback (or a legacy card frame) as a `DecisionRequest`."""
    event = _obj(payload.get("event")) if "event" in payload else payload
    operator = _obj(event.get("operator"))
    action = _obj(event.get("action"))
    value = _obj(action.get("value"))
    open_id = _str(operator.get("open_id")) or _str(event.get("open_id"))
    tenant = (
        _str(operator.get("tenant_key")) or _str(event.get("tenant_key")) or _str(_obj(payload.get("header")).get("tenant_key"))
    )
    verb = value.get("action")
    approval_id = _str(value.get("approval_id"))
    if open_id is None or verb not in ("approve", "reject", *EDIT_VERBS) or approval_id is None:
        raise BadPayload("card action without operator, action or approval id")
    if len(approval_id) > 64:
        raise BadPayload("approval id is too long")
    reason = _obj(action.get("form_value")).get("reject_reason")
    reason = reason.strip()[:REASON_LIMIT] if isinstance(reason, str) and verb == "reject" else ""
    return DecisionRequest(
        approval_id=approval_id,
        user=User(platform=PLATFORM, id=open_id, tenant=tenant),
        approve=verb == "approve",
        reason=reason or None,
        revision=card_revision(value.get("revision")),
    )
