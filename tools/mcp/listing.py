"""What a server's tools were at start-up, and how the bot notices that they changed since.

A tool's `fingerprint` (title, description, input schema, annotations) is what the bot classified and
what its cards show. `ToolBook` keeps the first listing of a server and compares every later one with
it: after a reconnection, after the server's `notifications/tools/list_changed`, and before each MCP
write (`McpManager` lists again first). A tool listed differently, or no longer listed, joins
`changed` and stays there until the bot restarts; a tool that appears is logged, never offered.

`listen_for_changes` keeps a `subscriptions/listen` stream open on a 2026-07-28 connection, where a
server sends its change notifications only on such a stream; on an older connection they arrive on
the connection itself. Either way the SDK hands them to the client's `message_handler`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import anyio
import mcp_types
from mcp import Client
from mcp.client.subscriptions import SubscriptionLost
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

log = logging.getLogger("chatops.mcp")

MAX_PAGES = 20


def fingerprint(tool: mcp_types.Tool) -> str:
    """What the bot decided on at start-up about a tool: its description, input schema and annotations."""
    shown = {
        "title": tool.title,
        "description": tool.description,
        "inputSchema": tool.input_schema,
        "annotations": tool.annotations.model_dump(mode="json", exclude_none=True) if tool.annotations else None,
    }
    return json.dumps(shown, sort_keys=True, ensure_ascii=False, default=str)


async def list_all(client: Client) -> list[mcp_types.Tool]:
    """Every page of `tools/list` (at most `MAX_PAGES`); the caller bounds the time."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        if (cursor := page.next_cursor) is None:
            break
    return tools


class ToolBook:
    """One server's tools as first listed, and what every later listing changed."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.started_with: dict[str, str] | None = None  # tool name -> `fingerprint`, from the first listing
        self.changed: set[str] = set()  # listed differently (or not at all) since: refused until restart
        self.added: set[str] = set()  # listed since, not at start-up: never offered
        self.stale = False  # the server said its tools changed, and no listing came after
        self.notices = 0  # change notifications received
        self.listings = 0  # listings compared

    def notice(self) -> None:
        """The server said its tool list changed: until it is listed again, it is stale."""
        self.notices += 1
        self.stale = True

    def compare(self, tools: list[mcp_types.Tool], notices_before: int | None = None) -> None:
        """Remember the first listing; later, note each tool that is no longer the same or is new.
        `notices_before`: `notices` when this listing was asked for (a notice since keeps it stale)."""
        now = {tool.name: fingerprint(tool) for tool in tools}
        self.listings += 1
        if notices_before == self.notices:
            self.stale = False
        if self.started_with is None:
            self.started_with = now
            return
        changed = {name for name, seen in self.started_with.items() if now.get(name) != seen} - self.changed
        added = set(now) - set(self.started_with) - self.added
        if changed:
            self.changed |= changed
            log.warning(
                "MCP server %s changed %d tool(s) since start-up (%s); they are refused until the bot restarts",
                self.server, len(changed), _names(changed),
            )  # fmt: skip
        if added:
            self.added |= added
            log.warning(
                "MCP server %s lists %d new tool(s) (%s); they are not offered until the bot restarts",
                self.server, len(added), _names(added),
            )  # fmt: skip


def _names(names: set[str]) -> str:
    return ", ".join(sorted(names)[:10]) + (", …" if len(names) > 10 else "")


def announces_changes(client: Client) -> bool:
    """True when the server must be listened to for change notifications (a 2026-07-28 connection whose
    server says `tools.listChanged`); older connections get them without asking."""
    tools = client.server_capabilities.tools
    return client.protocol_version in MODERN_PROTOCOL_VERSIONS and tools is not None and tools.list_changed is True


async def listen_for_changes(
    client: Client, server: str, *, opened: Callable[[], None], closed: Callable[[], None], delay: Callable[[int], float]
) -> None:
    """Keep a `subscriptions/listen` stream for tool changes open; runs until cancelled.

    The events themselves reach the client's `message_handler`. There is no replay: `opened` is called
    each time a stream is acknowledged, so what changed while none was open is listed again. A stream
    that ends is opened again after `delay(failures)` seconds; a server that refuses it is logged, and
    its changes are then caught only after a reconnection or before a write; a closed connection is
    reported to `closed` (reconnect), as a call does.
    """
    failures = 0
    while True:
        began = time.monotonic()
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                opened()
                async for _ in subscription:
                    pass
            ended = "the server closed it"
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                closed()
                return
            if exc.code in (mcp_types.METHOD_NOT_FOUND, mcp_types.INVALID_PARAMS):
                log.warning("MCP server %s refused to report tool changes (%s)", server, exc.message)
                return
            ended = f"{exc.message} (MCP error {exc.code})"
        except (SubscriptionLost, TimeoutError) as exc:
            ended = str(exc) or type(exc).__name__
        failures = 1 if time.monotonic() - began > delay(0) * 10 else failures + 1
        wait = delay(failures)
        log.info("MCP server %s: the stream of tool changes ended (%s); opening it again in %.1fs", server, ended, wait)
        await anyio.sleep(wait)


async def relist(client: Client, book: ToolBook, within: float) -> None:
    """List the tools again within `within` seconds and compare. Raises TimeoutError or the SDK's error."""
    notices = book.notices
    try:
        async with asyncio.timeout(within):
            tools = await list_all(client)
    except TimeoutError:
        raise TimeoutError(f"no answer to tools/list within {within:g}s") from None
    book.compare(tools, notices)
