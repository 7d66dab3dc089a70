"""The audit page's aiohttp application: the token check, security headers, error pages, the log,
a run's timeline and "Verify now". Every route but one is GET (and HEAD) and changes nothing; the one
that changes what the page says, "Verify now", is a POST from the page's own form, refused from other
sites (see `crosssite`). Every database access is a read transaction run in a worker thread.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from bot.auditweb import reader
from bot.auditweb.crosssite import FIELD, MAX_AGE, foreign_load, foreign_origin
from bot.auditweb.downloads import export
from bot.auditweb.page import HERE, PAGE, SECURITY_HEADERS, AuditPage
from bot.auditweb.timeline import build_timeline
from bot.auditweb.verification import altered, badge, changed_since
from bot.cli_audit import run_rows
from storage.audit_keys import AuditKeys

log = logging.getLogger("chatops.audit")
COOKIE = "chatops_audit"
RUN_REF = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")
# Where "Verify now" may send the browser back to: a path on this page, printable ASCII only (browsers
# drop tabs and line breaks from a URL, so `/<TAB>/evil.example` would become `//evil.example`).
LOCAL_PATH = re.compile(r"/(?![/\\])[\x21-\x7e]*")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _url(path: str, params: dict[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


def _here(request: web.Request) -> str:
    """This page's path and query, without a token given in the query."""
    return _url(request.path, {k: v for k, v in request.query.items() if k != "token"})


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_host(request: web.Request) -> bool:
    """Whether the Host header names this machine (127.0.0.1, ::1, localhost), whatever the port."""
    name = request.url.raw_host or ""
    return name.lower() in ("localhost", "localhost.") or is_loopback(name.strip("[]"))


async def _authorised(page: AuditPage, request: web.Request, handler: Handler) -> web.StreamResponse:
    if foreign_load(request):
        raise web.HTTPForbidden(
            text="Another site asked your browser to load this page in the background; it is not served that way."
        )
    if page.token is None:
        # Without a token only this machine may read the page; a page whose name was made to resolve
        # to 127.0.0.1 (DNS rebinding) would otherwise be same-origin with it and read the whole log.
        if not _loopback_host(request):
            raise web.HTTPMisdirectedRequest(
                text="Without CHATOPS_AUDIT_TOKEN this page answers only to 127.0.0.1, [::1] or localhost."
            )
        return await handler(request)
    bearer = request.headers.get("Authorization", "")
    if bearer.startswith("Bearer ") and _same(bearer[7:].strip(), page.token):
        return await handler(request)
    if _same(request.cookies.get(COOKIE, ""), page.cookie_value()):
        return await handler(request)
    if _same(request.query.get("token", ""), page.token):
        # Trade the token for the cookie and drop it from the address (bar, history, bookmarks).
        response = web.Response(status=303, headers={"Location": _here(request)})
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
    size = _size(request)

    def work(session: Session) -> dict[str, Any]:
        found: dict[str, Any] = {"choices": reader.choices(session), "head": reader.head(session)}
        found["staged"] = reader.staged_count(session)
        found["changed"] = changed_since(session, page.last_verification)
        try:
            found["page"] = reader.read_page(session, filters, before=before, after=after, size=size)
        except reader.BadFilter as exc:
            found["problem"] = str(exc)
        return found

    found = await page.read(work)
    params = {**filters.as_params(), "size": request.query.get("size", "")}
    result = found.get("page")
    edited = altered(result.rows, page.keys) if result else set()
    return page.render(
        "log.html",
        400 if "problem" in found else 200,
        filters=filters,
        choices=found["choices"],
        page=result,
        problem=found.get("problem"),
        staged=found["staged"],
        badge=badge(page.last_verification, found["head"], found["changed"], edited),
        verification=page.last_verification,
        edited=edited,
        newest_url=_url("/", params) if before or after else None,
        newer_url=_url("/", {**params, "after": result.newer_after}) if result and result.newer_after else None,
        older_url=_url("/", {**params, "before": result.older_before}) if result and result.older_before else None,
        csv_url=_url("/export.csv", filters.as_params()),
        jsonl_url=_url("/export.jsonl", filters.as_params()),
        verify_form=_verify_form(page, request),
    )


def _verify_form(page: AuditPage, request: web.Request) -> dict[str, Any]:
    """What the page's "Verify now" form posts: where to come back to, and this page's form token."""
    return {"next": _here(request), FIELD: page.forms.issue(), "since": page.verifying_since}


def _seq(request: web.Request, name: str) -> int | None:
    value = request.query.get(name, "")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > reader.MAX_SEQ:
        raise web.HTTPBadRequest(text=f"{name}: {value!r} is not a row number")
    return int(value)


def _size(request: web.Request) -> int:
    value = request.query.get("size", "")
    if not value:
        return reader.PAGE_SIZE
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= reader.MAX_PAGE_SIZE):
        raise web.HTTPBadRequest(text=f"size: {value!r} is not a number of rows from 1 to {reader.MAX_PAGE_SIZE}")
    return int(value)


async def run_page(request: web.Request) -> web.Response:
    page: AuditPage = request.app[PAGE]
    ref = request.match_info["ref"]
    if not RUN_REF.match(ref):
        raise web.HTTPNotFound(text="No such run: a run id looks like run-… and an approval id like ap-….")

    def work(session: Session) -> tuple[list[Any], int, str | None]:
        return run_rows(session, ref), reader.head(session), changed_since(session, page.last_verification)

    rows, current_head, changed = await page.read(work)
    edited = altered(rows, page.keys)
    if not rows:
        raise web.HTTPNotFound(text=f"No audit rows for {ref}.")
    run_id = next((row.run_id for row in rows if row.run_id), ref)
    return page.render(
        "run.html",
        timeline=build_timeline(run_id, rows),
        ref=ref,
        badge=badge(page.last_verification, current_head, changed, edited),
        verification=page.last_verification,
        edited=edited,
        verify_form=_verify_form(page, request),
    )


async def verify_now(request: web.Request) -> web.Response:
    """Verify the whole chain (unless a verification is running already), then go back to the page
    the form was on, which shows the result (or that one is still running)."""
    page: AuditPage = request.app[PAGE]
    why = foreign_origin(request)
    form = await request.post() if why is None else {}
    if why is None and not page.forms.valid(str(form.get(FIELD, ""))):
        why = f"the form carried no valid token of this page (a page has one for {MAX_AGE // 3600} hours, until a restart)"
    if why is not None:
        log.warning("audit page: a verification request was refused: %s", why)
        raise web.HTTPForbidden(text=f"Verification refused: {why}. Open the audit page and click “Verify now” there.")
    await page.verify_chain()
    target = str(form.get("next", "/"))
    if not LOCAL_PATH.fullmatch(target) or "\\" in target:
        target = "/"
    raise web.HTTPSeeOther(target)


async def verify_by_get(request: web.Request) -> web.Response:
    """Opening /verify (a link, an `<img>` on another site) verifies nothing."""
    raise web.HTTPMethodNotAllowed(
        request.method,
        ["POST"],
        text="“Verify now” is a button on the audit page (a POST from its form); opening /verify changes nothing.",
    )


def make_app(engine: sa.Engine, token: str | None, keys: AuditKeys | None = None) -> web.Application:
    """The audit page over a read-only engine (see `reader.make_read_engine`); `keys` verify the chain."""
    app = web.Application(middlewares=[guard])
    app[PAGE] = AuditPage(engine, token, keys)
    app.router.add_get("/", log_page)
    app.router.add_get("/run/{ref}", run_page)
    app.router.add_post("/verify", verify_now)
    app.router.add_get("/verify", verify_by_get)
    app.router.add_get("/export.csv", export("csv"))
    app.router.add_get("/export.jsonl", export("jsonl"))
    app.router.add_static("/static/", HERE / "static")
    return app
