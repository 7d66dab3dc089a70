"""The Feishu scopes the code needs, by the API calls it makes (`FeishuApi._call(what, ...)`) and the
event it receives. The README's scope table lists exactly these (`tests/test_feishu_scopes.py`)."""

from __future__ import annotations

# `_call` name -> scopes it needs (bot info and the tenant token need none).
CALL_SCOPES: dict[str, tuple[str, ...]] = {
    "bot info": (),
    "reply": ("im:message:send_as_bot",),
    "send": ("im:message:send_as_bot",),
    "patch": ("im:message:send_as_bot",),
    "edit": ("im:message:send_as_bot",),
    "recall": ("im:message:send_as_bot",),  # the progress line, once a streamed answer replaced it
    "card create": ("cardkit:card:write",),  # long answers: a CardKit streaming card
    "card stream": ("cardkit:card:write",),
    "card settings": ("cardkit:card:write",),  # the run's progress line (a text message, at most 20 edits)
    "reaction": ("im:message.reactions:write_only",),
    "user info": ("contact:contact.base:readonly", "contact:user.department:readonly"),
    "chat members": ("im:chat.members:read",),
}
# `im.message.receive_v1`: group messages that @mention the bot, and direct messages.
EVENT_SCOPES: tuple[str, ...] = ("im:message.group_at_msg:readonly", "im:message.p2p_msg:readonly")

NEEDED_SCOPES: frozenset[str] = frozenset({s for scopes in CALL_SCOPES.values() for s in scopes} | set(EVENT_SCOPES))
