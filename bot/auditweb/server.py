"""The audit page's aiohttp application: routes, token check, security headers, downloads.

Only GET (and HEAD) routes exist; every database access is a read transaction run in a worker
thread. Templates autoescape everything: audit rows carry text users and the model wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from bot.auditweb import reader
from bot.auditweb.timeline import build_timeline
from bot.auditweb.verification import Verification, badge, verify
from bot.cli_audit import run_rows, write_csv, write_jsonl
from storage.models import utcnow

log = logging.getLogger("chatops.audit")
HERE = Path(__file__).resolve().parent
COOKIE = "chatops_audit"
RUN_REF = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuditPage:
    """The state of one running audit page: the read-only engine, the token, the last verification."""

    def __init__(self, engine: sa.Engine, token: str | None) -> None:
        self.engine = engine
        self.token = token
        self.last_verification: Verification | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
        )
        self.templates.filters["when"] = lambda at: at.strftime("%Y-%m-%d %H:%M:%S")
        self.templates.filters["compact_json"] = _compact_json
        self.templates.filters["preview"] = _preview

    async def read(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one read transaction, in a worker thread."""

        def run() -> T:
            with Session(self.engine) as session:
                return work(session)

        return await asyncio.to_thread(run)

    def render(self, name: str, http_status: int = 200, **context: Any) -> web.Response:
        html = self.templates.get_template(name).render(**context)
        return web.Response(text=html, status=http_status, content_type="text/html", charset="utf-8")

    def cookie_value(self) -> str:
        """What the browser keeps after a valid `?token=`: derived from the token, not the token."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"chatops audit page cookie", hashlib.sha256).hexdigest()


def _preview(value: Any, length: int = 90) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))
    return text if len(text) <= length else text[: length - 1] + "…"


PAGE = web.AppKey("page", AuditPage)


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, indent=2)


def _url(path: str, params: dict[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer, our own error pages, and the token when one is set."""
    page: AuditPage = request.app[PAGE]
    try:
        response = await _authorised(page, request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = page.render("error.html", exc.status, status=exc.status, message=exc.text or exc.reason)
        response.headers.update({k: v for k, v in exc.headers.items() if k in ("WWW-Authenticate", "Allow")})
    except SQLAlchemyError as exc:
        log.warning("audit page: the database cannot be read: %s", str(exc).splitlines()[0][:300])
        response = page.render("error.html", 503, status=503, message="The audit database cannot be read right now.")
    except Exception:
        log.exception("audit page: unexpected failure on %s", request.path)
        response = page.render("error.html", 500, status=500, message="Something went wrong; the server log says what.")
    if not response.prepared:  # a download has sent its headers already (they include these)
        response.headers.update(SECURITY_HEADERS)
    return response


async def _authorised(page: AuditPage, request: web.Request, handler: Handler) -> web.StreamResponse:
    if page.token is None:
        return await handler(request)
    bearer = request.headers.get("Authorization", "")
    if bearer.startswith("Bearer ") and _same(bearer[7:].strip(), page.token):
        return await handler(request)
    if _same(request.cookies.get(COOKIE, ""), page.cookie_value()):
        return await handler(request)
    if _same(request.query.get("token", ""), page.token):
        response = await handler(request)
        response.set_cookie(COOKIE, page.cookie_value(), httponly=True, samesite="Strict", path="/")
        return response
    raise web.HTTPUnauthorized(
        text="This audit page needs its token: open it once as /?token=… or send “Authorization: Bearer …”.",
        headers={"WWW-Authenticate": 'Bearer realm="chatops audit"'},
    )


async def log_page(request: web.Request) -> web.Response:
    page: AuditPage = request.app[PAGE]
    filters = reader.Filters.from_query(request.query)
    before, after = _seq(request, "before"), _seq(request, "after")
    size = request.query.get("size", reader.PAGE_SIZE)

    def work(session: Session) -> dict[str, Any]:
        found: dict[str, Any] = {"choices": reader.choices(session), "head": reader.head(session)}
        found["staged"] = reader.staged_count(session)
        try:
            found["page"] = reader.read_page(session, filters, before=before, after=after, size=size)
        except reader.BadFilter as exc:
            found["problem"] = str(exc)
        return found

    found = await page.read(work)
    params = {**filters.as_params(), "size": request.query.get("size", "")}
    result = found.get("page")
    return page.render(
        "log.html",
        400 if "problem" in found else 200,
        filters=filters,
        choices=found["choices"],
        page=result,
        problem=found.get("problem"),
        staged=found["staged"],
        badge=badge(page.last_verification, found["head"]),
        verification=page.last_verification,
        newest_url=_url("/", params) if before or after else None,
        newer_url=_url("/", {**params, "after": result.newer_after}) if result and result.newer_after else None,
        older_url=_url("/", {**params, "before": result.older_before}) if result and result.older_before else None,
        csv_url=_url("/export.csv", filters.as_params()),
        jsonl_url=_url("/export.jsonl", filters.as_params()),
        verify_url=_url("/verify", {"next": request.path_qs}),
    )


def _seq(request: web.Request, name: str) -> int | None:
    value = request.query.get(name, "")
    if not value:
        return None
    if not value.isdigit():
        raise web.HTTPBadRequest(text=f"{name}: {value!r} is not a row number")
    return int(value)


async def run_page(request: web.Request) -> web.Response:
    page: AuditPage = request.app[PAGE]
    ref = request.match_info["ref"]
    if not RUN_REF.match(ref):
        raise web.HTTPNotFound(text="No such run: a run id looks like run-… and an approval id like ap-….")

    def work(session: Session) -> tuple[list[Any], int]:
        return run_rows(session, ref), reader.head(session)

    rows, current_head = await page.read(work)
    if not rows:
        raise web.HTTPNotFound(text=f"No audit rows for {ref}.")
    run_id = next((row.run_id for row in rows if row.run_id), ref)
    return page.render(
        "run.html",
        timeline=build_timeline(run_id, rows),
        ref=ref,
        badge=badge(page.last_verification, current_head),
        verification=page.last_verification,
        verify_url=_url("/verify", {"next": request.path_qs}),
    )


async def verify_now(request: web.Request) -> web.Response:
    """Verify the whole chain, then go back to the page the user was on."""
    page: AuditPage = request.app[PAGE]
    page.last_verification = await page.read(verify)
    target = request.query.get("next", "/")
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        target = "/"
    raise web.HTTPSeeOther(target)


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
        await response.prepare(request)
        session = Session(page.engine)
        try:
            batches = reader.iter_filtered(session, filters)
            first = True
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                buffer = io.StringIO(newline="")
                if fmt == "csv":
                    write_csv(batch, buffer, header=first)
                else:
                    write_jsonl(batch, buffer)
                first = False
                await response.write(buffer.getvalue().encode("utf-8"))
            if first and fmt == "csv":
                await response.write(_csv_header())
        finally:
            await asyncio.to_thread(session.close)
        await response.write_eof()
        return response

    return download


def _csv_header() -> bytes:
    buffer = io.StringIO(newline="")
    write_csv([], buffer)
    return buffer.getvalue().encode("utf-8")


def make_app(engine: sa.Engine, token: str | None) -> web.Application:
    """The audit page over a read-only engine (see `reader.make_read_engine`)."""
    app = web.Application(middlewares=[guard])
    app[PAGE] = AuditPage(engine, token)
    app.router.add_get("/", log_page)
    app.router.add_get("/run/{ref}", run_page)
    app.router.add_get("/verify", verify_now)
    app.router.add_get("/export.csv", export("csv"))
    app.router.add_get("/export.jsonl", export("jsonl"))
    app.router.add_static("/static/", HERE / "static")
    return app
