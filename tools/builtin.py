"""The built-in toolsets offered to the model (CRM, e-mail, notifications)."""

from __future__ import annotations

from bot.config import Settings
from tools.registry import Toolset


def builtin_toolsets(settings: Settings) -> list[Toolset]:
    """Every built-in toolset; each tool reads its own configuration from the ToolContext at call time."""
    import importlib

    toolsets = []
    for name in ("tools.crm", "tools.email", "tools.notify"):
        try:  # DEVELOPMENT-ONLY GUARD: removed once the tool modules land
            toolsets.append(importlib.import_module(name).toolset)
        except (ImportError, AttributeError):
            continue
    return toolsets
