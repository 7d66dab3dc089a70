"""CRM tools against both backends: the built-in table (SQLite and PostgreSQL) and a local HubSpot fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from storage.engine import BACKGROUND_LOCK_WAIT, Database
from storage.migrate import upgrade
from storage.models import CrmLead
from tests.fakes.hubspot import CONTACTS, FakeHubSpot
from tests.fault_helpers import LockHolder
from tests.tool_env import tool_context as build_context
from tools import crm
from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolInDoubt, ToolUnavailable
from tools.registry import PreparedCall, ToolRegistry, ToolSpec

SPECS = {spec.name: spec for spec in crm.toolset.specs}
NEW_LEAD = {"name": "Zhang San", "email": "ZhangSan@Example.com", "need": "a demo of the API", "company": "ACME"}


def tool_context(database_url: str, db: Database, approval_id: str | None = None, **env: str) -> ToolContext:
    return build_context(db, approval_id=approval_id, DATABASE_URL=database_url, **env)


async def call(ctx: ToolContext, name: str, args: dict[str, Any]) -> Any:
    """Validate like the registry does, run the pre-approval check, then run the tool."""
    prepared = ToolRegistry(crm.toolset.specs).prepare(name, json.dumps(args))
    assert isinstance(prepared, PreparedCall), prepared
    if prepared.spec.check is not None:
        await prepared.spec.check(ctx, prepared.args)
    return await prepared.spec.run(ctx, prepared.args)


async def preview(ctx: ToolContext, name: str, args: dict[str, Any]) -> list[str]:
    spec: ToolSpec = SPECS[name]
    assert spec.preview is not None
    return await spec.preview(ctx, args)


async def lead_rows(db: Database) -> list[CrmLead]:
    async with db.transaction() as session:
        return list((await session.execute(sa.select(CrmLead).order_by(CrmLead.id))).scalars())


def test_tool_declarations() -> None:
    assert SPECS["search_crm_leads"].read_only
    assert not SPECS["create_crm_lead"].read_only and not SPECS["update_crm_lead"].read_only
    assert SPECS["create_crm_lead"].sentence(NEW_LEAD).startswith("Create the CRM lead Zhang San <ZhangSan@Example.com> at ACME")


# ---- built-in backend ---------------------------------------------------------------------------


async def test_builtin_create_then_same_email_updates(db_url: str, db: Database) -> None:
    ctx = tool_context(db_url, db, approval_id="ap_1")
    assert await preview(ctx, "create_crm_lead", NEW_LEAD) == ["No lead has this e-mail: will create a new lead."]
    first = await call(ctx, "create_crm_lead", NEW_LEAD)
    assert first["result"] == "created"
    assert first["lead"]["email"] == "zhangsan@example.com" and first["lead"]["status"] == "new"
    lead_id = first["lead"]["id"]

    # Re-running the same approval does nothing, even with a different capitalisation of the address.
    again = await call(ctx, "create_crm_lead", {**NEW_LEAD, "email": "zhangsan@EXAMPLE.com"})
    assert again["result"] == "unchanged" and again["lead"]["id"] == lead_id

    changed = {**NEW_LEAD, "need": "pricing for 50 seats"}
    lines = await preview(tool_context(db_url, db), "create_crm_lead", changed)
    assert lines[0] == f"A lead with this e-mail exists (#{lead_id}): will update need."
    assert lines[1] == "need: “a demo of the API” → “pricing for 50 seats”"
    second = await call(tool_context(db_url, db, approval_id="ap_2"), "create_crm_lead", changed)
    assert second["result"] == "updated" and second["lead"]["id"] == lead_id

    rows = await lead_rows(db)
    assert [(r.id, r.email, r.need, r.source_approval_id) for r in rows] == [
        (lead_id, "zhangsan@example.com", "pricing for 50 seats", "ap_1")
    ]


async def test_builtin_concurrent_creations_make_one_lead(db_url: str, db: Database) -> None:
    contexts = [tool_context(db_url, db, approval_id=f"ap_{i}") for i in range(6)]
    results = await asyncio.gather(
        *(call(c, "create_crm_lead", {**NEW_LEAD, "need": f"need {i}"}) for i, c in enumerate(contexts))
    )
    assert sorted(r["result"] for r in results).count("created") == 1
    assert len({r["lead"]["id"] for r in results}) == 1
    assert len(await lead_rows(db)) == 1


async def test_builtin_search_and_update(db_url: str, db: Database) -> None:
    ctx = tool_context(db_url, db, approval_id="ap_1")
    await call(ctx, "create_crm_lead", NEW_LEAD)
    await call(
        tool_context(db_url, db, approval_id="ap_2"),
        "create_crm_lead",
        {"name": "李四", "email": "lisi@example.cn", "need": "需要报价"},
    )
    found = await call(ctx, "search_crm_leads", {"query": "acme"})
    assert [lead["name"] for lead in found["leads"]] == ["Zhang San"]
    assert (await call(ctx, "search_crm_leads", {"query": "报价"}))["leads"][0]["email"] == "lisi@example.cn"
    assert (await call(ctx, "search_crm_leads", {"query": "%"}))["count"] == 0  # LIKE wildcards are escaped
    assert (await call(ctx, "search_crm_leads", {"query": ""}))["count"] == 2

    lead_id = found["leads"][0]["id"]
    args = {"lead_id": lead_id, "status": "connected", "owner": "bob"}
    assert await preview(ctx, "update_crm_lead", args) == [
        f"Lead #{lead_id} (Zhang San <zhangsan@example.com>):",
        "status: “new” → “connected”",
        "owner: (empty) → “bob”",
    ]
    assert SPECS["update_crm_lead"].sentence(args) == f"Update CRM lead #{lead_id}: set status to “connected”, owner to “bob”"
    result = await call(ctx, "update_crm_lead", args)
    assert result["lead"]["status"] == "connected" and result["lead"]["owner"] == "bob"
    assert result["lead"]["need"] == NEW_LEAD["need"]  # untouched


async def test_builtin_refusals_before_any_card(db_url: str, db: Database) -> None:
    ctx = tool_context(db_url, db)
    with pytest.raises(ArgumentError, match="no lead #999"):
        await call(ctx, "update_crm_lead", {"lead_id": 999, "status": "open"})
    with pytest.raises(ArgumentError, match="Nothing to change"):
        await call(ctx, "update_crm_lead", {"lead_id": 1})
    with pytest.raises(ArgumentError, match="not a valid e-mail address"):
        await call(ctx, "create_crm_lead", {**NEW_LEAD, "email": "not-an-address"})
    prepared = ToolRegistry(crm.toolset.specs).prepare("update_crm_lead", '{"lead_id": 1, "status": "won"}')
    assert not isinstance(prepared, PreparedCall) and prepared.kind == "invalid_arguments"
    assert await lead_rows(db) == []


async def test_builtin_reads_do_not_wait_for_the_sqlite_write_lock(sqlite_url: str, tmp_path) -> None:
    """A search or a look-up only reads: another process holding SQLite's write lock (a backup, a
    long write of another replica) does not hold it up."""
    await asyncio.to_thread(upgrade, sqlite_url)
    db = Database(sqlite_url)
    holder = LockHolder(sqlite_url.removeprefix("sqlite:///"))
    try:
        ctx = tool_context(sqlite_url, db, approval_id="ap_1")
        created = await call(ctx, "create_crm_lead", NEW_LEAD)
        await holder.hold()
        async with asyncio.timeout(BACKGROUND_LOCK_WAIT / 2):  # a write would wait for the lock this long, then fail
            found = await call(ctx, "search_crm_leads", {"query": "acme"})
            preview_lines = await preview(ctx, "create_crm_lead", NEW_LEAD)  # looks the e-mail up
        assert [lead["name"] for lead in found["leads"]] == ["Zhang San"]
        assert preview_lines and str(created["lead"]["id"]) in " ".join(preview_lines)
    finally:
        holder.kill()
        await db.dispose()


# ---- HubSpot backend -----------------------------------------------------------------------------


@pytest.fixture
async def hubspot() -> AsyncIterator[FakeHubSpot]:
    async with FakeHubSpot() as fake:
        yield fake


@pytest.fixture
async def local_db(sqlite_url: str) -> AsyncIterator[Database]:
    database = Database(sqlite_url)  # the HubSpot backend never touches it
    yield database
    await database.dispose()


def hubspot_ctx(hubspot: FakeHubSpot, db: Database, token: str | None = None) -> ToolContext:
    return tool_context(
        "sqlite://",
        db,
        approval_id="ap_h1",
        CHATOPS_CRM="hubspot",
        HUBSPOT_BASE_URL=hubspot.url,
        HUBSPOT_TOKEN=token or hubspot.token,
    )


async def test_hubspot_create_new_contact(hubspot: FakeHubSpot, local_db: Database) -> None:
    ctx = hubspot_ctx(hubspot, local_db)
    assert await preview(ctx, "create_crm_lead", NEW_LEAD) == ["No lead has this e-mail: will create a new lead."]
    hubspot.requests.clear()
    result = await call(ctx, "create_crm_lead", NEW_LEAD)
    assert result["result"] == "created" and result["lead"]["id"] == 101
    search, create = hubspot.requests
    assert (search.method, search.path) == ("POST", f"{CONTACTS}/search")
    assert search.headers["Authorization"] == "Bearer pat-test-token"
    assert search.body["filterGroups"] == [
        {"filters": [{"propertyName": "email", "operator": "EQ", "value": "zhangsan@example.com"}]}
    ]
    assert (create.method, create.path) == ("POST", CONTACTS)
    assert create.headers["Authorization"] == "Bearer pat-test-token"
    assert create.body == {
        "properties": {
            "email": "zhangsan@example.com",
            "firstname": "Zhang",
            "lastname": "San",
            "message": "a demo of the API",
            "company": "ACME",
        }
    }


async def test_hubspot_existing_email_is_patched(hubspot: FakeHubSpot, local_db: Database) -> None:
    contact = hubspot.add_contact(email="zhangsan@example.com", firstname="Zhang", lastname="San", message="old need")
    ctx = hubspot_ctx(hubspot, local_db)
    lines = await preview(ctx, "create_crm_lead", NEW_LEAD)
    assert lines[0] == f"A lead with this e-mail exists (#{contact}): will update need, company."
    hubspot.requests.clear()
    result = await call(ctx, "create_crm_lead", NEW_LEAD)
    assert result["result"] == "updated"
    patch = hubspot.requests[-1]
    assert (patch.method, patch.path) == ("PATCH", f"{CONTACTS}/{contact}")
    assert patch.body == {"properties": {"message": "a demo of the API", "company": "ACME"}}
    assert len(hubspot.contacts) == 1


async def test_hubspot_conflict_when_search_lags(hubspot: FakeHubSpot, local_db: Database) -> None:
    contact = hubspot.add_contact(email="zhangsan@example.com", firstname="Zhang", lastname="San", message="old")
    hubspot.search_lags = True
    result = await call(hubspot_ctx(hubspot, local_db), "create_crm_lead", NEW_LEAD)
    assert result["result"] == "updated" and result["lead"]["id"] == int(contact)
    assert [(r.method, r.path) for r in hubspot.requests] == [
        ("POST", f"{CONTACTS}/search"),
        ("POST", CONTACTS),
        ("GET", f"{CONTACTS}/{contact}"),
        ("PATCH", f"{CONTACTS}/{contact}"),
    ]
    assert len(hubspot.contacts) == 1


async def test_hubspot_rate_limit_is_retried_then_bounded(hubspot: FakeHubSpot, local_db: Database) -> None:
    ctx = hubspot_ctx(hubspot, local_db)
    hubspot.fail_next(429, headers={"Retry-After": "0"})
    assert (await call(ctx, "search_crm_leads", {"query": ""}))["count"] == 0
    assert len(hubspot.requests) == 2

    hubspot.requests.clear()
    for _ in range(3):
        hubspot.fail_next(429, headers={"Retry-After": "0"})
    with pytest.raises(ToolUnavailable, match="rate-limiting"):
        await call(ctx, "search_crm_leads", {"query": ""})
    assert len(hubspot.requests) == 3

    hubspot.requests.clear()
    hubspot.fail_next(429, headers={"Retry-After": "3600"})
    with pytest.raises(ToolUnavailable, match="try again in 3600 seconds"):
        await call(ctx, "search_crm_leads", {"query": ""})
    assert len(hubspot.requests) == 1


async def test_hubspot_update_with_owner_email(hubspot: FakeHubSpot, local_db: Database) -> None:
    contact = hubspot.add_contact(email="a@example.com", firstname="Ann", lastname="Lee", hs_lead_status="NEW")
    hubspot.owners.append({"id": "77", "email": "bob@example.com"})
    ctx = hubspot_ctx(hubspot, local_db)
    result = await call(ctx, "update_crm_lead", {"lead_id": int(contact), "status": "connected", "owner": "bob@example.com"})
    assert result["lead"]["status"] == "connected" and result["lead"]["owner"] == "77"
    owners, patch = hubspot.requests[-2:]
    assert (owners.method, owners.path, owners.query["email"]) == ("GET", "/crm/v3/owners/", "bob@example.com")
    assert (patch.method, patch.path) == ("PATCH", f"{CONTACTS}/{contact}")
    assert patch.body == {"properties": {"hs_lead_status": "CONNECTED", "hubspot_owner_id": "77"}}
    with pytest.raises(ArgumentError, match="no lead #5"):
        await call(ctx, "update_crm_lead", {"lead_id": 5, "status": "open"})


async def test_hubspot_failures_are_clear(hubspot: FakeHubSpot, local_db: Database) -> None:
    with pytest.raises(ToolUnavailable, match="HUBSPOT_TOKEN"):
        await call(hubspot_ctx(hubspot, local_db, token="wrong"), "search_crm_leads", {"query": "x"})
    ctx = hubspot_ctx(hubspot, local_db)
    hubspot.fail_next(200, body={"total": 0, "results": []})  # the search finds nothing...
    hubspot.fail_next(502)  # ...and the creation fails on HubSpot's side: it may have happened
    with pytest.raises(ToolInDoubt):
        await call(ctx, "create_crm_lead", NEW_LEAD)
    hubspot.fail_next(400, body={"status": "error", "message": "Property values were not valid"})
    with pytest.raises(ToolError, match="Property values were not valid"):
        await call(ctx, "search_crm_leads", {"query": "x"})
    lines = await preview(hubspot_ctx(hubspot, local_db, token="wrong"), "create_crm_lead", NEW_LEAD)
    assert lines[0].startswith("Could not look the e-mail up in the CRM (HubSpot refused our token")


async def test_hubspot_unreachable_is_not_sent(local_db: Database) -> None:
    async with FakeHubSpot() as gone:
        url = gone.url  # nothing listens there once the block ends
    ctx = tool_context("sqlite://", local_db, approval_id="ap_h2", CHATOPS_CRM="hubspot", HUBSPOT_BASE_URL=url, HUBSPOT_TOKEN="t")
    for name, args in [("create_crm_lead", NEW_LEAD), ("update_crm_lead", {"lead_id": 1, "status": "open"})]:
        with pytest.raises(ToolUnavailable, match=r"not sent: HubSpot cannot be reached \(cannot connect") as caught:
            await SPECS[name].run(ctx, args)
        assert not isinstance(caught.value, ToolInDoubt)


async def test_hubspot_write_read_then_unanswered_is_in_doubt(hubspot: FakeHubSpot, local_db: Database) -> None:
    ctx = tool_context(
        "sqlite://",
        local_db,
        approval_id="ap_h3",
        CHATOPS_CRM="hubspot",
        HUBSPOT_BASE_URL=hubspot.url,
        HUBSPOT_TOKEN=hubspot.token,
        CHATOPS_TOOL_TIMEOUT="2",
    )
    hubspot.hang_next("POST", CONTACTS)
    with pytest.raises(ToolInDoubt, match=r"HubSpot did not answer \(no answer in time\); the change may or may not"):
        await call(ctx, "create_crm_lead", NEW_LEAD)
    assert hubspot.hung.is_set() and hubspot.requests[-1].body["properties"]["email"] == "zhangsan@example.com"
    hubspot.hang_next("POST", f"{CONTACTS}/search")  # a read that hangs changed nothing: unavailable, not in doubt
    with pytest.raises(ToolUnavailable, match=r"HubSpot did not answer \(no answer in time\)") as caught:
        await call(ctx, "search_crm_leads", {"query": "x"})
    assert not isinstance(caught.value, ToolInDoubt)


async def test_builtin_writes_and_reads_survive_a_connection_killed_from_outside(postgres_url: str) -> None:
    """A dropped connection inside the built-in CRM ended an approved create "in doubt" (it ran on a bare
    transaction, never tried again) although nothing was written. Each of its transactions is now tried
    again from its start: the lead is created once and a search after another kill finds it."""
    from tests.fault_helpers import schema_of, terminate_backends

    upgrade(postgres_url)
    db = Database(postgres_url)
    try:
        ctx = tool_context(postgres_url, db, approval_id="ap-kill")
        await call(ctx, "search_crm_leads", {"query": ""})  # the pool holds a live connection now
        retried: list[BaseException] = []
        db.on_retry(retried.append)
        assert terminate_backends(postgres_url, schema_of(postgres_url)) >= 1
        created = await call(ctx, "create_crm_lead", NEW_LEAD)
        assert terminate_backends(postgres_url, schema_of(postgres_url)) >= 1
        found = await call(ctx, "search_crm_leads", {"query": "zhang"})
        assert len(retried) >= 2, retried
        assert "zhangsan@example.com" in json.dumps(created) + json.dumps(found)
        assert [row.email for row in await lead_rows(db)] == ["zhangsan@example.com"]
    finally:
        await db.dispose()
