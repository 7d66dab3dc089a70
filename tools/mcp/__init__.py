"""MCP servers as tool sources: the configuration file, the connections, and the tools they offer.

`config.py` reads and validates CHATOPS_MCP_CONFIG; `connection.py` keeps one server connected
in its own task; `specs.py` turns a listed tool into a `ToolSpec` (name, classification,
argument checking, result text); `manager.py` ties them together for `bot.app.build_app`.
"""

from tools.mcp.config import McpConfig, ServerConfig, load_config, parse_config
from tools.mcp.manager import McpManager

__all__ = ["McpConfig", "McpManager", "ServerConfig", "load_config", "parse_config"]
