"""`ToolContext`: what a tool may use, handed to it explicitly on every call.

It carries each toolset's typed configuration (`tools.config`) and typed services
(`tools.services`, the e-mail sender), never the bot's settings. The core fills the call facts
(`approval_id`, `requester`) through `for_call`; any object with a requester's attributes will do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from tools.config import CrmConfig, FeishuRobotConfig

if TYPE_CHECKING:
    from storage.engine import Database
    from tools.services import SlackPoster
    from tools.smtp import SmtpSender


class Requester(Protocol):
    """Who asked for the call: a person on a platform, by immutable id."""

    @property
    def platform(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def tenant(self) -> str | None: ...

    @property
    def name(self) -> str | None: ...


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """Dependencies and call facts for one tool call.

    `approval_id` is set for approved writes: tools use it as their idempotency key
    (CRM source id, e-mail Message-ID). A toolset whose service is None is not configured,
    and its tools say so to the model.
    """

    db: Database | None = None
    crm: CrmConfig = field(default_factory=CrmConfig)
    smtp: SmtpSender | None = None
    feishu_robot: FeishuRobotConfig | None = None
    slack: SlackPoster | None = None
    approval_id: str | None = None
    requester: Requester | None = None

    def for_call(self, *, approval_id: str | None, requester: Requester | None) -> ToolContext:
        return replace(self, approval_id=approval_id, requester=requester)
