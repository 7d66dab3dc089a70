"""A local HTTP server playing HubSpot's CRM v3 contacts API (real HTTP on 127.0.0.1).

It implements what the HubSpot backend uses: create (409 with "Existing ID" on a duplicate
e-mail, as HubSpot does), read, patch, search (`filterGroups` EQ on a property, or a free-text
`query`), and the owners lookup. Every request is recorded (method, path, query, headers, JSON
body) so tests can check them field by field. `fail_next` queues canned answers (429, 500...)
served before the real handler; `search_lags` hides new contacts from search, like HubSpot's
eventually consistent search index. `hang_next(method, path)` makes the next such request read
its whole body and then never answer (`hung` is set when that happens).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CONTACTS = "/crm/v3/objects/contacts"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class Canned:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeHubSpot:
    """Use as an async context manager; `url` is the base URL to give HUBSPOT_BASE_URL."""

    token: str = "pat-test-token"
    contacts: dict[str, dict[str, str]] = field(default_factory=dict)
    owners: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    search_lags: bool = False
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    _hang: set[tuple[str, str]] = field(default_factory=set)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _canned: deque[Canned] = field(default_factory=deque)
    _ids: Any = field(default_factory=lambda: itertools.count(101))
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        self._canned.append(Canned(status, body or {"status": "error", "message": f"canned {status}"}, headers or {}))

    def hang_next(self, method: str, path: str) -> None:
        self._hang.add((method, path))

    def add_contact(self, **props: str) -> str:
        contact_id = str(next(self._ids))
        self.contacts[contact_id] = dict(props)
        return contact_id

    async def __aenter__(self) -> FakeHubSpot:
        app = web.Application(middlewares=[self._record])
        app.router.add_post(CONTACTS, self._create)
        app.router.add_post(f"{CONTACTS}/search", self._search)
        app.router.add_get(CONTACTS + "/{id}", self._get)
        app.router.add_patch(CONTACTS + "/{id}", self._patch)
        app.router.add_get("/crm/v3/owners/", self._owners)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._release.set()
        await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append(Recorded(request.method, request.path, dict(request.query), dict(request.headers), body))
        if (request.method, request.path) in self._hang:
            self._hang.discard((request.method, request.path))
            self.hung.set()
            await self._release.wait()  # the body was read; the answer never comes
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(
                {"status": "error", "category": "INVALID_AUTHENTICATION", "message": "Authentication credentials not found."},
                status=401,
            )
        if self._canned:
            canned = self._canned.popleft()
            return web.json_response(canned.body, status=canned.status, headers=canned.headers)
        return await handler(request)

    def _object(self, contact_id: str) -> dict[str, Any]:
        return {"id": contact_id, "properties": {"hs_object_id": contact_id, **self.contacts[contact_id]}, "archived": False}

    def _by_email(self, email: str) -> str | None:
        return next((cid for cid, props in self.contacts.items() if props.get("email") == email.lower()), None)

    async def _create(self, request: web.Request) -> web.Response:
        props = dict((await request.json())["properties"])
        props["email"] = props.get("email", "").lower()
        existing = self._by_email(props["email"])
        if existing is not None:
            return web.json_response(
                {"status": "error", "category": "CONFLICT", "message": f"Contact already exists. Existing ID: {existing}"},
                status=409,
            )
        contact_id = self.add_contact(**props)
        return web.json_response(self._object(contact_id), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        contact_id = request.match_info["id"]
        if contact_id not in self.contacts:
            return web.json_response({"status": "error", "category": "OBJECT_NOT_FOUND", "message": "not found"}, status=404)
        return web.json_response(self._object(contact_id))

    async def _patch(self, request: web.Request) -> web.Response:
        contact_id = request.match_info["id"]
        if contact_id not in self.contacts:
            return web.json_response({"status": "error", "category": "OBJECT_NOT_FOUND", "message": "not found"}, status=404)
        self.contacts[contact_id].update((await request.json())["properties"])
        return web.json_response(self._object(contact_id))

    async def _search(self, request: web.Request) -> web.Response:
        body = await request.json()
        found = [] if self.search_lags else list(self.contacts)
        for group in body.get("filterGroups", []):
            for flt in group["filters"]:
                assert flt["operator"] == "EQ", flt
                found = [cid for cid in found if self.contacts[cid].get(flt["propertyName"]) == flt["value"]]
        if query := body.get("query"):
            found = [cid for cid in found if any(query.lower() in v.lower() for v in self.contacts[cid].values() if v)]
        results = [self._object(cid) for cid in found[: body.get("limit", 10)]]
        return web.json_response({"total": len(found), "results": results})

    async def _owners(self, request: web.Request) -> web.Response:
        email = request.query.get("email")
        return web.json_response({"results": [o for o in self.owners if email is None or o["email"] == email]})
