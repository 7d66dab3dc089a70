"""Running the audit page: where it may listen, and the server's life until Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from bot.auditweb.reader import make_read_engine
from bot.auditweb.server import is_loopback, make_app
from bot.core.errors import ChatopsError
from storage.audit_keys import AuditKeys

log = logging.getLogger("chatops.audit")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class PathOnlyAccessLog(AbstractAccessLogger):
    """Who read which page: method and path only (a query string may hold the token)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %.3fs', request.remote, request.method, request.path, response.status, time)


ACCESS_LOG: dict[str, Any] = {"access_log": log, "access_log_class": PathOnlyAccessLog}


def check_exposure(host: str, token: str | None) -> None:
    """The audit trail leaves this machine only behind a token."""
    if not is_loopback(host) and not token:
        raise ChatopsError(
            f"--host {host}: the audit page listens beyond this machine only with a token; set CHATOPS_AUDIT_TOKEN"
        )


async def serve_audit_page(
    database_url: str,
    host: str,
    port: int,
    token: str | None,
    *,
    keys: AuditKeys | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until SIGINT/SIGTERM. `announce` receives the page's address once it listens."""
    check_exposure(host, token)
    engine = make_read_engine(database_url)
    runner = web.AppRunner(make_app(engine, token, keys), **ACCESS_LOG)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        announce(f"audit page: http://{shown}:{bound[1]}/" + (" (token required)" if token else ""))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        engine.dispose()
