"""Typed configuration of each toolset, built by the app from its settings.

Tools never read the bot's settings: each toolset receives one of these frozen records through
`tools.context.ToolContext`. Every timeout here is per blocking step (connect, greeting, one
command, one HTTP read) and shorter than the tool timeout, so a hung server ends in a clear
outcome from the tool itself rather than in the executor's generic "no answer" timeout.
A value that cannot work raises `ToolConfigError` naming the variable to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Literal

from tools.errors import ToolConfigError

SmtpSecurity = Literal["starttls", "ssl", "none"]
DEFAULT_SMTP_PORTS: dict[str, int] = {"ssl": 465, "starttls": 587, "none": 25}


@dataclass(frozen=True, kw_only=True)
class HttpTimeouts:
    """Per-request limits: `connect` until the connection is open (nothing sent yet), `read` for each wait on the server."""

    connect: float = 10.0
    read: float = 30.0


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    """How to reach the mail server, and what may be sent.

    `timeout` bounds each step (connect with TLS and greeting, each command, the reply to the
    message); `budget` bounds the whole send, retries and waiting for a free worker included.
    """

    host: str
    sender: str
    port: int | None = None
    security: SmtpSecurity = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    allowed_domains: frozenset[str] = frozenset()
    timeout: float = 30.0
    budget: float = 48.0
    workers: int = 4
    attempts: int = 3

    def __post_init__(self) -> None:
        address = parseaddr(self.sender)[1]
        if not address or "@" not in address:
            raise ToolConfigError("SMTP_FROM", "must be the sender's address (e.g. bot@example.com) when SMTP_HOST is set")
        if self.timeout <= 0 or self.budget <= 0 or self.workers < 1 or self.attempts < 1:
            raise ToolConfigError("SMTP_TIMEOUT", "must be a positive number of seconds")

    @property
    def envelope_sender(self) -> str:
        return parseaddr(self.sender)[1]

    @property
    def server_port(self) -> int:
        return self.port or DEFAULT_SMTP_PORTS[self.security]


@dataclass(frozen=True, kw_only=True)
class HubSpotConfig:
    base_url: str
    token: str = field(repr=False)
    timeouts: HttpTimeouts = HttpTimeouts()


@dataclass(frozen=True, kw_only=True)
class CrmConfig:
    """The CRM backend: the bot's own table (`builtin`) or HubSpot (then `hubspot` is required)."""

    backend: Literal["builtin", "hubspot"] = "builtin"
    hubspot: HubSpotConfig | None = None

    def __post_init__(self) -> None:
        if self.backend == "hubspot" and self.hubspot is None:
            raise ToolConfigError("HUBSPOT_TOKEN", "is required when CHATOPS_CRM=hubspot")


@dataclass(frozen=True, kw_only=True)
class FeishuRobotConfig:
    """A Feishu group robot's webhook, and its signing secret when the robot has one."""

    url: str
    secret: str | None = field(default=None, repr=False)
    timeouts: HttpTimeouts = HttpTimeouts()
