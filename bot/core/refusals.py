"""Audit rows for signed requests the adapters refuse as malformed (HTTP 4xx).

A request that carries a valid signature came from the platform (or from whoever holds its
secret), so refusing it is worth a row in the audit trail; unsigned junk is only logged. The
reason is a short fixed phrase chosen by the adapter, never the request body.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from bot.core.context import AppContext

log = logging.getLogger("chatops")


async def record_refused_request(ctx: AppContext, platform: str, reason: str) -> None:
    """One `request_refused` row; a database failure is logged (the answer is a 4xx either way)."""
    try:
        async with ctx.db.transaction(urgent=True) as session:
            await ctx.audit.record(session, "request_refused", platform=platform, status="bad_request", reason=reason)
    except SQLAlchemyError as exc:
        log.warning("%s: could not audit a refused request (%s)", platform, type(exc).__name__)
