"""Tool contexts for tool tests, built from an explicit environment exactly as the app builds them."""

from __future__ import annotations

from dataclasses import replace

from bot.config import load_settings
from bot.toolsetup import build_tool_services
from storage.engine import Database
from tools.context import ToolContext
from tools.services import SlackPoster


def tool_context(db: Database, *, approval_id: str | None = None, slack: SlackPoster | None = None, **env: str) -> ToolContext:
    """`bot.toolsetup.build_tool_services` over `load_settings(environ=env)`, with the call facts set."""
    services = build_tool_services(load_settings(env_file=None, environ=env), db)
    return replace(services.context, approval_id=approval_id, slack=slack)
