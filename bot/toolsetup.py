"""From the bot's settings to each toolset's typed configuration and services (`tools.context.ToolContext`).

Tools never see `Settings`: this module is the one place that reads the tool variables. Every
per-step timeout handed to a tool is derived from CHATOPS_TOOL_TIMEOUT so that a hung server ends
in the tool's own clear outcome ("not sent" or "in doubt") before the executor's generic timeout.
A `ToolConfigError` raised by a toolset becomes the operator's `ConfigError`, naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bot.config import Settings
from bot.core.errors import ConfigError
from storage.engine import Database
from tools.config import CrmConfig, FeishuRobotConfig, HttpTimeouts, HubSpotConfig, SmtpConfig
from tools.context import ToolContext
from tools.errors import ToolConfigError
from tools.smtp import SmtpSender

BUDGET_SHARE = 0.8  # of the tool timeout, for a tool's whole work (retries included)
HTTP_CONNECT = 10.0
HTTP_READ = 30.0
SMTP_WORKERS = 4


@contextmanager
def operator_errors() -> Iterator[None]:
    """Turn a toolset's configuration error into the operator's ConfigError."""
    try:
        yield
    except ToolConfigError as exc:
        raise ConfigError(exc.variable, exc.problem) from None


def http_timeouts(settings: Settings) -> HttpTimeouts:
    budget = settings.tool_timeout * BUDGET_SHARE
    return HttpTimeouts(connect=min(HTTP_CONNECT, budget / 4), read=min(HTTP_READ, budget / 2))


def smtp_config(settings: Settings) -> SmtpConfig | None:
    """None when e-mail is not configured (SMTP_HOST unset); the tool then says what to set."""
    if not settings.smtp_host:
        return None
    budget = settings.tool_timeout * BUDGET_SHARE
    with operator_errors():
        return SmtpConfig(
            host=settings.smtp_host,
            sender=settings.smtp_from or "",
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            allowed_domains=settings.allowed_email_domains,
            timeout=min(settings.smtp_timeout, budget / 2),
            budget=budget,
            workers=SMTP_WORKERS,
        )


def crm_config(settings: Settings) -> CrmConfig:
    hubspot = None
    if settings.hubspot_token is not None:
        hubspot = HubSpotConfig(
            base_url=settings.hubspot_base_url, token=settings.hubspot_token.get_secret_value(), timeouts=http_timeouts(settings)
        )
    with operator_errors():
        return CrmConfig(backend=settings.crm_backend, hubspot=hubspot)


def feishu_robot_config(settings: Settings) -> FeishuRobotConfig | None:
    if not settings.feishu_webhook_url:
        return None
    secret = settings.feishu_webhook_secret.get_secret_value() if settings.feishu_webhook_secret else None
    return FeishuRobotConfig(url=settings.feishu_webhook_url, secret=secret, timeouts=http_timeouts(settings))


def mcp_call_timeout(settings: Settings) -> float:
    return settings.tool_timeout * BUDGET_SHARE


@dataclass
class ToolServices:
    """The tool context and what must be closed when the bot stops."""

    context: ToolContext
    closers: list[Callable[[], Any]] = field(default_factory=list)


def build_tool_services(settings: Settings, db: Database) -> ToolServices:
    """Every toolset's config and services from the settings. Raises ConfigError."""
    config = smtp_config(settings)
    sender = SmtpSender(config) if config is not None else None
    context = ToolContext(db=db, crm=crm_config(settings), smtp=sender, feishu_robot=feishu_robot_config(settings))
    return ToolServices(context, [sender.close] if sender is not None else [])
