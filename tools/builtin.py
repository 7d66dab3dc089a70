"""The built-in toolsets offered to the model (CRM, e-mail, notifications)."""

from __future__ import annotations

from bot.config import Settings
from tools.registry import Toolset


def builtin_toolsets(settings: Settings) -> list[Toolset]:
    """Every built-in toolset; each tool reads its own configuration from the ToolContext at call time."""
    from tools import crm, email, notify

    return [crm.toolset, email.toolset, notify.toolset]
