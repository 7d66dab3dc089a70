"""The contract between the core and the channel adapters (Slack, Feishu, terminal).

The core only speaks in `Thread`, `CardView` and plain text; each adapter renders them in its
own platform's terms. Nothing here imports a platform SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from bot.core.events import Thread


@dataclass(frozen=True)
class CardField:
    """One argument of the frozen call as display text (`bot.core.display.show`): complete, never cut.

    Renderers shorten `value` on the compact card and show it whole in the full view; a
    `multiline` value keeps its line breaks and is shown with a gutter (`cards.quoted`)."""

    label: str
    value: str
    multiline: bool = False


@dataclass(frozen=True)
class CardView:
    """An approval card, platform-neutral, built by code from the stored approval."""

    approval_id: str
    tool: str
    summary: str
    fields: tuple[CardField, ...]
    requester: str
    requester_id: str
    expires_at: datetime
    status: str
    rule: str
    warnings: tuple[str, ...] = ()
    preview: tuple[str, ...] = ()
    decided_by: str | None = None
    decided_by_id: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    outcome: str | None = None
    votes: tuple[str, ...] = field(default_factory=tuple)
    lang: str | None = None  # the requester's language: the card renders in it on every replica
    tz: str | None = None
    revision: int = 1  # the version of the call shown; buttons carry it (an older card's click acts on nothing)
    edited_by: tuple[str, ...] = ()  # who edited the call, if anyone

    @property
    def actionable(self) -> bool:
        """Buttons are shown only while the approval is pending."""
        return self.status == "pending"


class DeliveryFailed(Exception):
    """An adapter could not deliver a post. `retry_after` is the wait the platform asked for (429);
    `permanent` means trying again cannot help (unknown channel, message rejected as invalid)."""

    def __init__(self, reason: str, *, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.permanent = permanent


class Channel(Protocol):
    """What the core needs from a platform adapter. Posting methods raise `DeliveryFailed` (or any
    exception, taken as transient) when the platform did not take the post; the outbox retries."""

    platform: str

    async def post_reply(self, thread: Thread, text: str) -> None:
        """Post the bot's answer (or a notice) in the thread."""

    async def show_working(self, thread: Thread) -> None:
        """Show at once that the bot is on it (a reaction or a status message)."""

    async def post_card(self, thread: Thread, card: CardView) -> str | None:
        """Post an approval card in the thread; returns the platform message id."""

    async def update_card(self, thread: Thread, message_id: str, card: CardView) -> None:
        """Replace a posted card in place (buttons gone once decided)."""
