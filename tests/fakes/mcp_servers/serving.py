"""How the SDK-based fake MCP servers here run (`flaky.py`, `shifting.py`): over stdio, or over
streamable HTTP on a port they print once they listen. They are started as scripts, so they import
this module as `serving` (their own folder is first on `sys.path`)."""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any


def http_port() -> int | None:
    """The `--http PORT` the script was started with (0: any free port), or None for stdio."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=None, metavar="PORT", help="serve streamable HTTP (0: any free port)")
    port: int | None = parser.parse_args().http
    return port


def serve(server: Any, port: int | None) -> None:
    """Serve `server` (an `MCPServer`) over stdio, or over HTTP: listen first, then print the port, so a
    client may connect as soon as it reads the line."""
    if port is None:
        asyncio.run(server.run_stdio_async())
        return
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(server.streamable_http_app(host="127.0.0.1"), log_level="warning")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
