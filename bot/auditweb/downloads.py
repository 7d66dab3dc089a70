"""CSV and JSONL downloads of the filtered rows, streamed in batches (each its own short read
transaction), in the format of `chatops audit export` (the same writers)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from sqlalchemy.orm import Session

from bot.auditweb import reader
from bot.auditweb.page import PAGE, SECURITY_HEADERS, AuditPage
from bot.cli_audit import write_csv, write_jsonl
from storage.models import utcnow

log = logging.getLogger("chatops.audit")


def export(fmt: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The filtered rows (all of them, oldest first) as a CSV or JSONL download."""

    async def download(request: web.Request) -> web.StreamResponse:
        page: AuditPage = request.app[PAGE]
        filters = reader.Filters.from_query(request.query)
        try:
            filters.where()
        except reader.BadFilter as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8",
                "Content-Disposition": f'attachment; filename="chatops-audit-{stamp}.{fmt}"',
                **SECURITY_HEADERS,
            }
        )
        session = Session(page.engine)
        try:
            batches = reader.iter_filtered(session, filters)
            first: list[Any] = await asyncio.to_thread(next, batches, [])  # a database failure is still a clean 503 here
            await response.prepare(request)
            await _stream_rows(response, first, batches, fmt)
            await response.write_eof()
        except ConnectionResetError:
            log.info("audit page: a download was abandoned by the client")
        finally:
            await asyncio.to_thread(session.close)
        return response

    return download


async def _stream_rows(response: web.StreamResponse, first: list[Any], batches: Iterator[list[Any]], fmt: str) -> None:
    """Write the first batch, then the others (each read in a worker thread), as CSV or JSONL."""
    batch: list[Any] | None = first
    header = True
    while batch is not None:
        buffer = io.StringIO(newline="")
        if fmt == "csv":
            write_csv(batch, buffer, header=header)
        else:
            write_jsonl(batch, buffer)
        header = False
        await response.write(buffer.getvalue().encode("utf-8"))
        batch = await asyncio.to_thread(next, batches, None) if batch else None
