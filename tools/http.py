"""Our own HTTP calls from tools (HubSpot, the Feishu robot): one aiohttp session per call, with
per-step timeouts, and the one rule that tells "not sent" from "in doubt".

A request that failed while connecting (refused, DNS, TLS, connect timeout) cannot have reached
the server: nothing happened. Any failure after the connection was open (a reset, a read
timeout, a truncated answer) may come after the server read the request, so for a write its
effect is unknown.
"""

from __future__ import annotations

import aiohttp

from tools.config import HttpTimeouts


def session(timeouts: HttpTimeouts, headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A session whose every request has `timeouts` (no overall limit: the tool timeout is above)."""
    limit = aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_connect=timeouts.connect, sock_read=timeouts.read)
    return aiohttp.ClientSession(timeout=limit, headers=headers)


def never_sent(exc: BaseException) -> bool:
    """True when the request failed before any byte of it can have reached the server."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def describe(exc: BaseException) -> str:
    """A short, secret-free reason for a transport failure."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connection timed out"
    if isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__
