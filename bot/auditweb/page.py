"""The state of one running audit page and how it renders: the read-only engine, the token, the
form tokens, the last verification (and the one running, never more than one), and the Jinja2
templates (autoescaping everything: audit rows carry text users and the model wrote)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.orm import Session

from bot.auditweb.crosssite import FormTokens
from bot.auditweb.verification import Verification, verify
from storage.audit_keys import AuditKeys
from storage.models import utcnow

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # under no-referrer our own form would send `Origin: null`
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
T = TypeVar("T")
SHOWN_DATA = 20_000  # characters of one row's data a page shows (the downloads keep everything)


class AuditPage:
    """The state of one running audit page: the read-only engine, the token, the audit key ring, the
    form tokens, the last verification and the one running."""

    def __init__(self, engine: sa.Engine, token: str | None, keys: AuditKeys | None = None) -> None:
        self.engine = engine
        self.token = token
        self.keys = keys
        self.forms = FormTokens()
        self.last_verification: Verification | None = None
        self.verifying_since: datetime | None = None
        self._verifying: asyncio.Task[None] | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
        )
        self.templates.filters["when"] = lambda at: at.strftime("%Y-%m-%d %H:%M:%S")
        self.templates.filters["compact_json"] = _compact_json
        self.templates.filters["preview"] = _preview
        self.templates.filters["clip"] = _clip

    async def read(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one read transaction, in a worker thread."""

        def run() -> T:
            with Session(self.engine) as session:
                return work(session)

        return await asyncio.to_thread(run)

    async def verify_chain(self) -> bool:
        """Verify the whole chain and wait for it; False, at once, when a verification is running
        already (they are never stacked). The run finishes and records its result even when the
        request that started it goes away."""
        if self._verifying is not None:
            return False
        self.verifying_since = utcnow()
        self._verifying = asyncio.create_task(self._verify())
        await asyncio.shield(self._verifying)
        return True

    async def _verify(self) -> None:
        try:
            self.last_verification = await self.read(lambda session: verify(session, self.keys))
        finally:
            self._verifying, self.verifying_since = None, None

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


def _clip(text: str, length: int = SHOWN_DATA) -> str:
    """A row's data as a page shows it: at most `length` characters, and how many more there are."""
    if len(text) <= length:
        return text
    return f"{text[:length]}\n… {len(text) - length:,} more characters: the JSONL download holds the whole row"


PAGE = web.AppKey("page", AuditPage)


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, indent=2)
