"""The HubSpot backend: leads are HubSpot contacts, reached through the CRM v3 REST API.

Why HubSpot: its CRM API is plain REST + JSON with a bearer token (a private-app token), it is
the de-facto standard small-team CRM with a free tier, and the base URL is configurable
(HUBSPOT_BASE_URL), so a proxy, a sandbox or a local fake can stand in for it.

Mapping: name -> `firstname` + `lastname` (split at the last space), need -> `message`,
company -> `company`, status -> `hs_lead_status` (upper-case enum), owner -> `hubspot_owner_id`
(an owner id, or an owner's e-mail looked up through `/crm/v3/owners`).

HubSpot enforces one contact per e-mail and answers a duplicate creation with 409 naming the
existing id; we then update that contact, so creating is idempotent without extra state.
Rate limits: a 429 is retried at most `ATTEMPTS` times, waiting `Retry-After` (capped).
Failures are classified by `tools.http`: a request that failed while connecting changed nothing
("not sent"); a write that was sent but got no answer (a reset, a read timeout) is `ToolInDoubt`,
never resent. Each request has the configured connect and read timeouts.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tools import http
from tools.config import HubSpotConfig
from tools.crm.backend import NO_SUCH_LEAD, SEARCH_LIMIT, Lead, LeadFields, Outcome, normalise_email
from tools.errors import ToolError, ToolInDoubt, ToolUnavailable
from tools.phrases import Sentence

# What HubSpot's failures say (the model reads the English; a decided card shows them translated)
NOT_REACHED = Sentence("hubspot.NOT_REACHED", "not sent: HubSpot cannot be reached ({reason}). Nothing was changed.")
NO_ANSWER_WRITE = Sentence(
    "hubspot.NO_ANSWER_WRITE", "HubSpot did not answer ({reason}); the change may or may not have been applied"
)
NO_ANSWER = Sentence("hubspot.NO_ANSWER", "HubSpot did not answer ({reason}).")
RATE_LIMITED = Sentence(
    "hubspot.RATE_LIMITED", "HubSpot is rate-limiting us; try again in {seconds} seconds. Nothing was changed."
)
UNREADABLE_WRITE = Sentence(
    "hubspot.UNREADABLE_WRITE", "HubSpot answered {status} with an unreadable body; the change was probably applied"
)
UNREADABLE = Sentence("hubspot.UNREADABLE", "HubSpot answered {status} with an unreadable body.")
TOKEN_REFUSED = Sentence(
    "hubspot.TOKEN_REFUSED", "HubSpot refused our token ({status}: {detail}). Check HUBSPOT_TOKEN and its scopes."
)
FAILED_WRITE = Sentence("hubspot.FAILED_WRITE", "HubSpot failed with {status}; the change may or may not have been applied")
FAILED = Sentence("hubspot.FAILED", "HubSpot failed with {status}. Try again later.")
REJECTED = Sentence("hubspot.REJECTED", "HubSpot rejected the request ({status}): {detail}")
NO_CONTACT_ID = Sentence("hubspot.NO_CONTACT_ID", "HubSpot sent a contact without a usable id: {contact}")
EXISTS_UNNAMED = Sentence("hubspot.EXISTS_UNNAMED", "HubSpot says a contact with {email} exists but did not say which.")
EXISTS_UNFOUND = Sentence("hubspot.EXISTS_UNFOUND", "HubSpot says contact {contact_id} has {email} but cannot find it.")
OWNER_FORM = Sentence("hubspot.OWNER_FORM", "In HubSpot the owner must be an owner id or the owner's e-mail address.")
NO_OWNER = Sentence("hubspot.NO_OWNER", "No HubSpot owner has the e-mail address {owner}.")

CONTACTS = "/crm/v3/objects/contacts"
PROPERTIES = ("email", "firstname", "lastname", "company", "message", "hs_lead_status", "hubspot_owner_id")
ATTEMPTS = 3
MAX_RETRY_AFTER = 10.0
_EXISTING_ID = re.compile(r"Existing ID:\s*(\d+)")


def _lead(obj: dict[str, Any]) -> Lead:
    props = obj.get("properties") or {}
    name = " ".join(p for p in (props.get("firstname"), props.get("lastname")) if p)
    status = props.get("hs_lead_status")
    if not str(obj.get("id", "")).isdigit():
        raise ToolError(NO_CONTACT_ID(contact=str(obj)[:200]))
    return Lead(
        id=int(obj["id"]),
        name=name,
        email=props.get("email") or "",
        need=props.get("message") or "",
        company=props.get("company") or None,
        status=status.lower() if status else None,
        owner=props.get("hubspot_owner_id") or None,
    )


def _split_name(name: str) -> dict[str, str]:
    first, _, last = name.strip().rpartition(" ")
    return {"firstname": first, "lastname": last} if first else {"firstname": last, "lastname": ""}


def _message(status: int, body: Any, text: str) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body)[:300]
    return (str(body) if body is not None else text)[:300]


class _Answer:
    """An HTTP answer read in full: status, headers, text and the parsed JSON (None when unreadable)."""

    def __init__(self, status: int, headers: Any, text: str) -> None:
        self.status, self.headers, self.text = status, headers, text
        try:
            self.json: Any = json.loads(text) if text else None
        except ValueError:
            self.json = None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def message(self) -> str:
        return _message(self.status, self.json, self.text)


class HubSpotCrm:
    """`CrmBackend` over HubSpot contacts. Use `HubSpotCrm.connect(config)` to get one."""

    name = "HubSpot"

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: HubSpotConfig) -> AsyncIterator[HubSpotCrm]:
        headers = {"Authorization": f"Bearer {config.token}", "Accept": "application/json"}
        async with http.session(config.timeouts, headers=headers) as session:
            yield cls(session, config.base_url)

    async def _send(self, method: str, path: str, *, write: bool, **kwargs: Any) -> _Answer:
        """One request, read in full; transport failures classified as "not sent" or "in doubt"."""
        try:
            async with self.session.request(method, self.base_url + path, **kwargs) as response:
                return _Answer(response.status, response.headers, await response.text())
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = http.describe(exc)
            if http.never_sent(exc):
                raise ToolUnavailable(NOT_REACHED(reason=reason)) from None
            if write:
                raise ToolInDoubt(NO_ANSWER_WRITE(reason=reason)) from None
            raise ToolUnavailable(NO_ANSWER(reason=reason)) from None

    async def _call(
        self, method: str, path: str, *, write: bool, allow: tuple[int, ...] = (), **kwargs: Any
    ) -> tuple[int, dict[str, Any]]:
        """One API call -> (status, JSON body). 429 is retried (bounded); a status >= 400 not in `allow` raises."""
        for attempt in range(1, ATTEMPTS + 1):
            response = await self._send(method, path, write=write, **kwargs)
            if response.status != 429:
                self._check_status(response, write=write, allow=allow)
                return response.status, self._body(response, write=write)
            wait = self._retry_after(response, attempt)
            if wait > MAX_RETRY_AFTER or attempt == ATTEMPTS:
                raise ToolUnavailable(RATE_LIMITED(seconds=f"{wait:g}"))
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    def _retry_after(response: _Answer, attempt: int) -> float:
        try:
            return max(0.0, float(response.headers.get("Retry-After", "")))
        except ValueError:
            return float(attempt)

    @staticmethod
    def _body(response: _Answer, *, write: bool) -> dict[str, Any]:
        body = response.json
        if isinstance(body, dict):
            return body
        if response.is_success and write:
            raise ToolInDoubt(UNREADABLE_WRITE(status=response.status))
        if response.is_success:
            raise ToolError(UNREADABLE(status=response.status))
        return {}

    @staticmethod
    def _check_status(response: _Answer, *, write: bool, allow: tuple[int, ...]) -> None:
        status = response.status
        if status in (401, 403):
            raise ToolUnavailable(TOKEN_REFUSED(status=status, detail=response.message()))
        if status >= 500:
            if write:
                raise ToolInDoubt(FAILED_WRITE(status=status))
            raise ToolUnavailable(FAILED(status=status))
        if status >= 400 and status not in allow:
            raise ToolError(REJECTED(status=status, detail=response.message()))

    async def _search(self, body: dict[str, Any]) -> list[Lead]:
        _, answer = await self._call("POST", f"{CONTACTS}/search", write=False, json={**body, "properties": list(PROPERTIES)})
        return [_lead(obj) for obj in answer.get("results", [])]

    async def get(self, lead_id: int) -> Lead | None:
        params = {"properties": ",".join(PROPERTIES)}
        status, answer = await self._call("GET", f"{CONTACTS}/{lead_id}", write=False, allow=(404,), params=params)
        return None if status == 404 else _lead(answer)

    async def find_by_email(self, email: str) -> Lead | None:
        flt = {"propertyName": "email", "operator": "EQ", "value": normalise_email(email)}
        found = await self._search({"filterGroups": [{"filters": [flt]}], "limit": 1})
        return found[0] if found else None

    async def search(self, query: str) -> list[Lead]:
        body: dict[str, Any] = {"limit": SEARCH_LIMIT}
        if query.strip():
            body["query"] = query.strip()
        return await self._search(body)

    async def upsert(self, fields: LeadFields, *, approval_id: str | None) -> tuple[Outcome, Lead]:
        existing = await self.find_by_email(fields.email)
        if existing is None:
            props = {"email": normalise_email(fields.email), **_split_name(fields.name), "message": fields.need}
            if fields.company is not None:
                props["company"] = fields.company
            status, answer = await self._call("POST", CONTACTS, write=True, allow=(409,), json={"properties": props})
            if status != 409:
                return "created", _lead(answer)
            # The search index lags behind creations: HubSpot itself tells us who already has this e-mail.
            match = _EXISTING_ID.search(str(answer.get("message", "")))
            if match is None:
                raise ToolError(EXISTS_UNNAMED(email=fields.email))
            existing = await self.get(int(match.group(1)))
            if existing is None:
                raise ToolError(EXISTS_UNFOUND(contact_id=match.group(1), email=fields.email))
        changes = fields.changes_for(existing)
        if not changes:
            return "unchanged", existing
        return "updated", await self.update(existing.id, changes)

    async def update(self, lead_id: int, changes: dict[str, str]) -> Lead:
        props: dict[str, str] = {}
        for key, value in changes.items():
            if key == "name":
                props.update(_split_name(value))
            elif key == "need":
                props["message"] = value
            elif key == "status":
                props["hs_lead_status"] = value.upper()
            elif key == "owner":
                props["hubspot_owner_id"] = await self.owner_id(value)
            else:
                props[key] = value
        status, answer = await self._call("PATCH", f"{CONTACTS}/{lead_id}", write=True, allow=(404,), json={"properties": props})
        if status == 404:
            raise ToolError(NO_SUCH_LEAD(lead_id=lead_id, crm=self.name))
        return _lead(answer)

    async def owner_id(self, owner: str) -> str:
        """A HubSpot owner id from an id or an owner's e-mail address."""
        owner = owner.strip()
        if owner.isdigit():
            return owner
        if "@" not in owner:
            raise ToolError(OWNER_FORM())
        _, answer = await self._call("GET", "/crm/v3/owners/", write=False, params={"email": owner, "limit": 1})
        results = answer.get("results") or []
        if not results:
            raise ToolError(NO_OWNER(owner=owner))
        return str(results[0]["id"])
