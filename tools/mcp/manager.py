"""`McpManager`: connects the configured MCP servers, offers their tools, calls them, keeps them alive.

Each server lives in its own long-lived asyncio task (`Connection._supervise`), because the
SDK's context managers (the stdio process, the HTTP client, the session) must be entered and
exited in one task. Tool calls come from other tasks and only send requests on the session.

- Start-up: every server is connected and listed in parallel, each within `connect_timeout`.
  A server that fails then is left out (its tools are not offered) and reported in `problems`.
- A server that dies later (process exit, broken HTTP transport) is reconnected in the
  background with exponential backoff and jitter. Meanwhile its tools answer `ToolUnavailable`.
- A call never is re-sent. A connection lost during a write is `ToolInDoubt`; during a read,
  `ToolUnavailable`. Over HTTP, a call whose request failed while connecting was never sent:
  `ToolUnavailable` ("not sent"), for a write too. Every call has `call_timeout` (the app sets
  it below CHATOPS_TOOL_TIMEOUT); a write that times out is in doubt too. Protocol errors (unknown tool, invalid params) are `ToolError`: nothing ran.
- Tools and their classification are fixed at start-up; a reconnection does not change them. The
  tools are listed again after a reconnection, after the server's `notifications/tools/list_changed`
  (within `connect_timeout`; a failure is logged), and before every write is sent (within half of
  `call_timeout`, all pages). A tool listed differently from start-up (title, description, schema,
  annotations) or no longer listed is refused ("not sent") until the bot restarts: the card and the
  rule were made for the old one. A write whose server cannot be listed then is "not sent" too, and so
  is a read while a change notification has not been followed by a listing. New tools are logged only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any

import mcp_types
from jsonschema.exceptions import SchemaError
from mcp import Client
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from tools.context import ToolContext
from tools.errors import ToolError, ToolInDoubt, ToolUnavailable
from tools.mcp.config import McpConfig, load_config
from tools.mcp.connection import Connection, leaf
from tools.mcp.specs import build_spec, classify, preview_of, result_of
from tools.phrases import Sentence
from tools.registry import Preview, ToolSpec

__all__ = ["McpManager"]

log = logging.getLogger("chatops.mcp")

# What a call's failures say (the model reads the English; a decided card shows them translated)
DOWN = Sentence(
    "mcp.DOWN", "The MCP server {server} is down ({problem}); it is being reconnected. Nothing was run; try again later."
)
UNREACHABLE = Sentence(
    "mcp.UNREACHABLE", "not sent: the MCP server {server} cannot be reached; {tool} did not run. Try again once it is back."
)
LOST_DURING_WRITE = Sentence(
    "mcp.LOST_DURING_WRITE", "the MCP server {server} disconnected during the call; {tool} may or may not have run"
)
LOST_DURING = Sentence("mcp.LOST_DURING", "The MCP server {server} disconnected during the call; try again once it is back.")
NO_ANSWER_WRITE = Sentence(
    "mcp.NO_ANSWER_WRITE", "no answer from the MCP server {server} within {seconds}s; {tool} may or may not have run"
)
NO_ANSWER = Sentence("mcp.NO_ANSWER", "The MCP server {server} did not answer within {seconds}s.")
REFUSED = Sentence("mcp.REFUSED", "The MCP server {server} refused the call ({code}): {detail}")
UNREADABLE_WRITE = Sentence("mcp.UNREADABLE_WRITE", "the MCP server {server} sent an unreadable answer; {tool} may have run")
UNREADABLE = Sentence("mcp.UNREADABLE", "The MCP server {server} sent an unreadable answer ({count} problems).")
NO_REASON = Sentence("mcp.NO_REASON", "{tool} failed (the server gave no reason)")
CHANGED = Sentence(
    "mcp.CHANGED",
    "not sent: the MCP server {server} changed {tool} since the bot started (its description, input schema or annotations "
    "differ from what the bot classified and showed); {tool} did not run. An operator must restart the bot to accept the "
    "new definition.",
)
UNCONFIRMED = Sentence(
    "mcp.UNCONFIRMED",
    "not sent: the MCP server {server} could not list its tools to confirm that {tool} is still the tool the bot "
    "classified and showed ({error}); {tool} did not run. Try again later.",
)


class McpManager:
    """All configured MCP servers. `start()` once, `close()` once."""

    def __init__(
        self,
        config: McpConfig,
        *,
        call_timeout: float = 50.0,
        connect_timeout: float = 30.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        self.config = config
        self.call_timeout = call_timeout
        self.problems: dict[str, str] = {}
        self._connections = {
            name: Connection(
                name,
                server,
                connect_timeout=connect_timeout,
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
                jitter=random.random,
            )
            for name, server in config.servers.items()
            if not server.disabled
        }

    @classmethod
    def from_file(cls, path: Path, **options: Any) -> McpManager:
        """A manager for the servers in the CHATOPS_MCP_CONFIG file. Raises ToolConfigError."""
        return cls(load_config(Path(path)), **options)

    def connection(self, server: str) -> Connection:
        return self._connections[server]

    async def start(self) -> list[ToolSpec]:
        """Connect every server and return the tools they offer. Failures land in `problems`."""
        listed = await asyncio.gather(*(c.start() for c in self._connections.values()))
        specs: list[ToolSpec] = []
        names: set[str] = set()
        for connection, tools in zip(self._connections.values(), listed, strict=True):
            if tools is None:
                self.problems[connection.name] = connection.problem or "could not connect"
                continue
            skipped: list[str] = []
            by_name = {tool.name: tool for tool in tools}
            for tool in tools:
                if not connection.config.offers(tool.name):
                    continue
                try:
                    preview = self._preview(connection, tool, by_name, skipped)
                    spec = build_spec(connection.name, connection.config, tool, self._call, preview)
                except SchemaError as exc:
                    skipped.append(f"{tool.name} (unusable input schema: {exc.message})")
                    continue
                if spec.name in names:
                    skipped.append(f"{tool.name} (its name {spec.name} is already taken)")
                    continue
                names.add(spec.name)
                specs.append(spec)
            if skipped:
                self.problems[connection.name] = "tools left out: " + "; ".join(skipped)
        return specs

    def _preview(
        self, connection: Connection, tool: mcp_types.Tool, by_name: dict[str, mcp_types.Tool], skipped: list[str]
    ) -> Preview | None:
        """The preview the operator configured for `tool`, when its preview tool exists and only reads."""
        override = connection.config.tools.get(tool.name)
        if override is None or override.preview is None:
            return None
        shown = by_name.get(override.preview)
        if shown is None or not classify(connection.config, shown).read_only:
            why = "is not offered by the server" if shown is None else "is not read-only"
            skipped.append(f"the preview of {tool.name} ({override.preview} {why}; shown without one)")
            return None
        return preview_of(connection.name, shown, self._call)

    async def _call(self, ctx: ToolContext, server: str, tool: str, args: dict[str, Any], write: bool) -> str:
        connection = self._connections[server]
        client = connection.client
        if client is None:
            raise ToolUnavailable(DOWN(server=server, problem=connection.problem or "reconnecting"))
        self._refuse_changed(connection, tool)
        timeout = self.call_timeout
        if write or connection.book.stale:
            started = time.monotonic()
            await self._confirm(connection, client, tool)
            self._refuse_changed(connection, tool)
            timeout = round(self.call_timeout - (time.monotonic() - started), 1)
        try:
            result = await client.call_tool(tool, args, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                connection.lost()
                if connection.never_sent(tool, args):
                    raise ToolUnavailable(UNREACHABLE(server=server, tool=tool)) from None
                if write:
                    raise ToolInDoubt(LOST_DURING_WRITE(server=server, tool=tool)) from None
                raise ToolUnavailable(LOST_DURING(server=server)) from None
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                if write:
                    raise ToolInDoubt(NO_ANSWER_WRITE(server=server, seconds=f"{timeout:g}", tool=tool)) from None
                raise ToolUnavailable(NO_ANSWER(server=server, seconds=f"{timeout:g}")) from None
            raise ToolError(REFUSED(server=server, code=exc.code, detail=exc.message)) from None
        except ValidationError as exc:
            if write:
                raise ToolInDoubt(UNREADABLE_WRITE(server=server, tool=tool)) from None
            raise ToolError(UNREADABLE(server=server, count=exc.error_count())) from None
        text = result_of(result)
        if result.is_error:
            raise ToolError(text or NO_REASON(tool=tool))
        return text

    @staticmethod
    def _refuse_changed(connection: Connection, tool: str) -> None:
        if tool in connection.changed:
            raise ToolUnavailable(CHANGED(server=connection.name, tool=tool))

    async def _confirm(self, connection: Connection, client: Client, tool: str) -> None:
        """List the server's tools again (at most half the call's time): `tool` must still be what the bot
        classified and the card showed. Raises ToolUnavailable ("not sent") when that cannot be known."""
        try:
            await connection.relist(self.call_timeout / 2, client)
        except Exception as exc:  # noqa: BLE001 - any failure to list: the call is not sent
            failure = leaf(exc)
            if isinstance(failure, MCPError) and failure.code == mcp_types.CONNECTION_CLOSED:
                raise ToolUnavailable(UNREACHABLE(server=connection.name, tool=tool)) from None
            why = connection.explain(failure)
            raise ToolUnavailable(UNCONFIRMED(server=connection.name, tool=tool, error=why)) from None

    async def close(self) -> None:
        """Disconnect every server (stdio processes are stopped)."""
        await asyncio.gather(*(c.close() for c in self._connections.values()))
