"""The small, platform-neutral event types that channel adapters hand to the core.

Adapters translate Slack/Feishu/terminal payloads into these and never pass platform types on.
Everything here is JSON-serialisable, because it is stored (inbox, runs, approvals).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class User:
    """A person (or bot) on a platform, identified by immutable ids, never by display name."""

    platform: str
    id: str
    tenant: str | None = None
    name: str | None = None
    is_bot: bool = False
    groups: tuple[str, ...] = ()
    lang: str | None = None  # the language the bot speaks with this person here (`bot.core.language`)
    tz: str | None = None  # their time zone, when the platform tells it (Slack `users.info`)

    @property
    def key(self) -> str:
        """A globally unique identity: platform, tenant and id."""
        return f"{self.platform}:{self.tenant or '-'}:{self.id}"

    @property
    def label(self) -> str:
        return self.name or self.id

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["groups"] = list(self.groups)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> User:
        return cls(**{**data, "groups": tuple(data.get("groups") or ())})


@dataclass(frozen=True)
class Thread:
    """Where replies go: a platform plus adapter-owned coordinates (channel, thread ts, chat id...)."""

    platform: str
    coords: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "coords": dict(self.coords)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thread:
        return cls(platform=data["platform"], coords=dict(data.get("coords") or {}))


@dataclass(frozen=True)
class IncomingMessage:
    """A user message addressed to the bot."""

    user: User
    text: str
    thread: Thread
    conversation_key: str
    dedupe_keys: tuple[str, ...]
    channel_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user.to_dict(),
            "text": self.text,
            "thread": self.thread.to_dict(),
            "conversation_key": self.conversation_key,
            "dedupe_keys": list(self.dedupe_keys),
            "channel_id": self.channel_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IncomingMessage:
        return cls(
            user=User.from_dict(data["user"]),
            text=data["text"],
            thread=Thread.from_dict(data["thread"]),
            conversation_key=data["conversation_key"],
            dedupe_keys=tuple(data["dedupe_keys"]),
            channel_id=data.get("channel_id"),
        )


@dataclass(frozen=True)
class DecisionRequest:
    """A click on Approve or Reject (or a typed decision in the terminal). `revision`: the version
    of the call the clicked card showed (None: not from a card, e.g. typed in the terminal)."""

    approval_id: str
    user: User
    approve: bool
    reason: str | None = None
    revision: int | None = None


@dataclass(frozen=True)
class EditRequest:
    """An Edit opened (`values` None) or submitted: the typed values by argument name, as entered
    (text, or a bool / None where the platform's input gives one), for the card's `revision`."""

    approval_id: str
    user: User
    revision: int | None = None
    values: dict[str, Any] | None = None


def card_revision(raw: Any) -> int:
    """The revision a button carries; a button without one (posted before edits existed) is revision 1."""
    text = str(raw if raw is not None else "")
    return int(text) if text.isdigit() and len(text) <= 9 else 1


_APPROVAL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,40}")


def checked_approval_id(raw: str) -> str:
    """The id as clicked when it can be one of ours, else a short stand-in that matches no approval.

    A signed click can still carry anything (5,000 characters, a NUL byte): the stand-in keeps such
    a value out of database queries (PostgreSQL refuses NUL and over-long keys) and out of messages,
    while the click is still answered "not found" and audited like any unknown id."""
    if _APPROVAL_ID.fullmatch(raw):
        return raw
    return "invalid-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:12]
