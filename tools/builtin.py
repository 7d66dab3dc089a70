"""The built-in toolsets offered to the model (CRM, e-mail, notifications)."""

from __future__ import annotations

from tools.registry import Toolset


def builtin_toolsets() -> list[Toolset]:
    """Every built-in toolset; each tool reads its own typed configuration from the ToolContext at call time."""
    from tools import crm, email, notify

    return [crm.toolset, email.toolset, notify.toolset]
