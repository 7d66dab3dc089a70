"""MCP servers as tool sources: the configuration file, the connections, and the tools they offer.

`config.py` reads and validates CHATOPS_MCP_CONFIG; `connection.py` keeps one server connected
in its own task; `listing.py` remembers each server's tools as first listed and compares every
later listing with them; `specs.py` turns a listed tool into a `ToolSpec` (name, classification,
argument checking, result text); `manager.py` ties them together for `bot.app.build_app`.

What the bot checks, and when: the tools and their classification are fixed at start-up. They are
listed again (every page) after a reconnection, when the server sends `notifications/tools/list_changed`
(on a 2026-07-28 connection the bot keeps a `subscriptions/listen` stream open for it), and just
before each write is sent. A tool listed differently (title, description, input schema, annotations)
or no longer listed is refused, "not sent", reads and writes alike, until the bot restarts; a tool that
appears is logged and not offered. A write is "not sent" too when that last listing fails (server down,
no answer within half the call's time), and so is a read after a change notification until a listing
succeeds.
"""

from tools.mcp.config import McpConfig, ServerConfig, load_config, parse_config
from tools.mcp.manager import McpManager

__all__ = ["McpConfig", "McpManager", "ServerConfig", "load_config", "parse_config"]
