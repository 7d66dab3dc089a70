"""The shape of a signed Slack request body, checked before Bolt and our listeners read it.

Slack's signature proves who sent a body, not that it is well formed; Bolt and `events.py` read
fields with `.get` on whatever they find, so a signed `[]`, `"event": "text"` or `"channel": 5`
would end in a 500 with a traceback. `check_body` parses the body as Bolt will (JSON, or a form
whose `payload` field is JSON, or a slash command's plain form) and validates the fields the bot reads with pydantic; any
mismatch raises `Malformed` (answered 400). Unknown fields and unknown payload types pass.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class Malformed(Exception):
    """The signed body is not a request Slack sends; the message names what is wrong (never the body)."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Event(_Open):
    type: str
    channel: str | None = None
    channel_type: str | None = None
    user: str | None = None
    text: str | None = None
    ts: str | None = None
    thread_ts: str | None = None
    subtype: str | None = None
    team: str | None = None
    user_team: str | None = None
    bot_id: str | None = None

    @model_validator(mode="after")
    def _a_message_says_where_and_who(self) -> _Event:
        """A mention, or a person's DM, names its channel, its ts and its author: Slack always sends them,
        and without them the bot could neither answer nor tell who asked (it was taken with a 200 and
        recorded for a channel called "None")."""
        person_dm = self.type == "message" and self.channel_type == "im" and self.subtype is None
        if self.type == "app_mention" or person_dm:
            for name in ("channel", "ts"):
                if not getattr(self, name):
                    raise ValueError(f"no {name}")
            if not (self.user or self.bot_id):
                raise ValueError("no user")
        return self


class _Team(_Open):
    id: str | None = None


class _User(_Open):
    id: str
    team_id: str | None = None
    name: str | None = None
    username: str | None = None


class _EventCallback(_Open):
    type: str
    event: _Event
    event_id: str | None = None
    team_id: str | None = None


class _UrlVerification(_Open):
    type: str
    challenge: str


class _Action(_Open):
    action_id: str | None = None
    value: str | None = None


class _Container(_Open):
    channel_id: str | None = None
    thread_ts: str | None = None


class _BlockActions(_Open):
    type: str
    user: _User
    actions: list[_Action]
    team: _Team | None = None
    channel: _Team | None = None
    container: _Container | None = None
    trigger_id: str | None = None


class _View(_Open):
    private_metadata: str | None = None
    callback_id: str | None = None
    state: dict[str, dict[str, dict[str, Any]]] | None = None


class _ViewSubmission(_Open):
    type: str
    user: _User
    view: _View
    team: _Team | None = None


class _Any(_Open):
    type: str


class _SlashCommand(_Open):
    """A slash command (`/chatops help`): a plain form, every field one string."""

    command: str
    text: str = ""
    user_id: str
    channel_id: str | None = None
    team_id: str | None = None


_BY_TYPE: dict[str, type[BaseModel]] = {
    "event_callback": _EventCallback,
    "url_verification": _UrlVerification,
    "block_actions": _BlockActions,
    "view_submission": _ViewSubmission,
}


def _parse(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The JSON object Bolt will read, or None for a form without `payload` (e.g. `ssl_check`)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("the body is not UTF-8") from None
    if content_type.startswith("application/x-www-form-urlencoded"):
        form = urllib.parse.parse_qs(text, keep_blank_values=True)
        if "payload" not in form:
            if "ssl_check" in form:
                return None
            if "command" in form:
                _check_command(form)
                return None
            raise Malformed("a form body without a payload")
        text = form["payload"][0]
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise Malformed("the payload is not JSON") from None
    if not isinstance(value, dict):
        raise Malformed("the payload is not a JSON object")
    return value


def _check_command(form: dict[str, list[str]]) -> None:
    if any(len(values) != 1 for values in form.values()):
        raise Malformed("slash command: a field is repeated")
    try:
        _SlashCommand.model_validate({k: v[0] for k, v in form.items()})
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "form"
        raise Malformed(f"slash command: bad or missing {where}") from None


def check_body(body: bytes, content_type: str) -> None:
    """Raise `Malformed` unless `body` is a request Slack could have sent."""
    payload = _parse(body, content_type)
    if payload is None:
        return
    kind = payload.get("type")
    model = _BY_TYPE.get(kind, _Any) if isinstance(kind, str) else _Any
    try:
        model.model_validate(payload)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "payload"
        raise Malformed(f"{kind if isinstance(kind, str) else 'payload'}: bad or missing {where}") from None
