"""`ToolContext`: what a tool may use, handed to it explicitly on every call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.core.events import User
    from storage.engine import Database


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """Dependencies and call facts for one tool call.

    `approval_id` is set for approved writes: tools use it as their idempotency key
    (CRM source id, e-mail Message-ID). `services` holds optional clients by name
    (e.g. "slack" for the Slack Web API client) so tools need no module globals.
    """

    settings: Settings
    db: Database
    approval_id: str | None = None
    requester: User | None = None
    services: dict[str, Any] | None = None

    def for_call(self, *, approval_id: str | None, requester: User | None) -> ToolContext:
        return replace(self, approval_id=approval_id, requester=requester)

    def service(self, name: str) -> Any | None:
        return (self.services or {}).get(name)
