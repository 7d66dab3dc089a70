"""A small MCP server (stdio, or streamable HTTP with `--http PORT`) whose tools misbehave on purpose.

Run as a script: `python flaky.py [--http PORT]` (with `--http` it first prints the port it
listens on). State lives in the directory named by the FLAKY_STATE environment variable: every
start appends a line to `starts.log`, every call of a write tool appends to `calls.log` *before*
doing anything else (so a test can count how many times the server received a call, across
crashes), and while a file named `refuse_start` exists the server exits at once (so it stays
down until the test removes it).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from serving import http_port, serve  # this folder is first on sys.path: the script is started as a file

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False)
server = MCPServer("flaky")


def _state() -> Path:
    return Path(os.environ.get("FLAKY_STATE", "."))


def _log(name: str, line: str) -> None:
    with (_state() / name).open("a", encoding="utf-8") as f:
        f.write(line + "\n")


@server.tool(annotations=READ_ONLY, structured_output=False)
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool(annotations=READ_ONLY, structured_output=False)
def big(size: int) -> str:
    """Return `size` characters."""
    return "x" * size


@server.tool(annotations=READ_ONLY, structured_output=False)
def fail(reason: str) -> str:
    """Fail with the given reason (a tool execution error, isError=true)."""
    raise ToolError(reason)


@server.tool(annotations=READ_ONLY, structured_output=False)
def die() -> str:
    """Exit the server process in the middle of a read call."""
    sys.stdout.flush()
    os._exit(3)


@server.tool(annotations=READ_ONLY, structured_output=False)
async def hang() -> str:
    """Never answer."""
    await asyncio.Event().wait()
    return "unreachable"


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False), structured_output=False)
def record(text: str) -> str:
    """Record a line (a write)."""
    _log("calls.log", f"record {text}")
    return f"recorded {text}"


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True), structured_output=False)
def crash_during(text: str) -> str:
    """Record a line, then crash before answering (a write whose outcome the client cannot know)."""
    _log("calls.log", f"crash_during {text}")
    os._exit(4)


def main() -> None:
    port = http_port()
    if (_state() / "refuse_start").exists():
        sys.exit(5)
    _log("starts.log", str(os.getpid()))
    serve(server, port)


if __name__ == "__main__":
    main()
