"""The CRM tools the model may call: create, search and update leads.

Only the tool declarations and their card hooks (describe, check, preview) live here; the
storage is a backend chosen by CHATOPS_CRM (`tools/crm/builtin.py`, `tools/crm/hubspot.py`).
Creating never makes a duplicate: a lead with the same e-mail is updated instead, and the card
says which of the two will happen before anyone approves.
"""

from __future__ import annotations

from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import Field

from tools.context import ToolContext
from tools.crm.backend import Lead, LeadFields, Status
from tools.crm.choice import open_backend
from tools.errors import ArgumentError
from tools.phrases import Joined, Sentence
from tools.registry import Toolset

__all__ = ["toolset"]

toolset = Toolset("crm")

UPDATABLE = ("status", "need", "owner")

# What the cards say (English; the app's catalogues translate them)
DESCRIBE_CREATE = Sentence("crm.DESCRIBE_CREATE", "Create the CRM lead {name} <{email}> (or update the lead with that e-mail)")
DESCRIBE_CREATE_AT = Sentence(
    "crm.DESCRIBE_CREATE_AT", "Create the CRM lead {name} <{email}> at {company} (or update the lead with that e-mail)"
)
DESCRIBE_UPDATE = Sentence("crm.DESCRIBE_UPDATE", "Update CRM lead #{lead_id}: set {changes}")
SET_FIELD = Sentence("crm.SET_FIELD", "{field} to “{value}”")
LOOKUP_FAILED = Sentence("crm.LOOKUP_FAILED", "Could not look the e-mail up in the CRM ({error}).")
NEW_LEAD = Sentence("crm.NEW_LEAD", "No lead has this e-mail: will create a new lead.")
LEAD_UNCHANGED = Sentence("crm.LEAD_UNCHANGED", "A lead with this e-mail exists (#{lead_id}): nothing would change.")
LEAD_UPDATED = Sentence("crm.LEAD_UPDATED", "A lead with this e-mail exists (#{lead_id}): will update {fields}.")
READ_FAILED = Sentence("crm.READ_FAILED", "Could not read lead #{lead_id} ({error}).")
LEAD = Sentence("crm.LEAD", "Lead {label}:")
CHANGE = Sentence("crm.CHANGE", "{field}: {old} → {new}")
QUOTED = Sentence("crm.QUOTED", "“{value}”")
EMPTY = Sentence("crm.EMPTY", "(empty)")
# What a call did (its result's "message", shown on the decided card)
CREATED = Sentence("crm.CREATED", "Created lead #{lead_id} in {crm}.")
UPDATED_EXISTING = Sentence("crm.UPDATED_EXISTING", "Updated the existing lead #{lead_id} in {crm}.")
ALREADY_SO = Sentence("crm.ALREADY_SO", "Lead #{lead_id} in {crm} already had these values.")
UPDATED = Sentence("crm.UPDATED", "Updated lead #{lead_id}: {fields}.")
DONE = {"created": CREATED, "updated": UPDATED_EXISTING, "unchanged": ALREADY_SO}


def _fields(args: dict[str, Any]) -> LeadFields:
    return LeadFields(name=args["name"].strip(), email=args["email"], need=args["need"], company=args.get("company"))


def _show(value: str | None) -> str:
    return QUOTED(value=value) if value else EMPTY()


def _error(exc: Exception) -> str:
    return str(getattr(exc, "message", type(exc).__name__))


async def _check_create(ctx: ToolContext, args: dict[str, Any]) -> None:
    if not args["name"].strip():
        raise ArgumentError("The lead's name is empty.")
    try:
        validate_email(args["email"], check_deliverability=False)
    except EmailNotValidError as exc:
        raise ArgumentError(f"{args['email']!r} is not a valid e-mail address: {exc}") from None


async def _preview_create(ctx: ToolContext, args: dict[str, Any]) -> list[str]:
    try:
        async with open_backend(ctx) as crm:
            lead = await crm.find_by_email(args["email"])
    except Exception as exc:  # noqa: BLE001 - a preview must never stop the card; it says what it could not check
        return [LOOKUP_FAILED(error=_error(exc))]
    if lead is None:
        return [NEW_LEAD()]
    changes = _fields(args).changes_for(lead)
    if not changes:
        return [LEAD_UNCHANGED(lead_id=lead.id)]
    lines: list[str] = [LEAD_UPDATED(lead_id=lead.id, fields=", ".join(changes))]
    lines += [CHANGE(field=key, old=_show(getattr(lead, key)), new=_show(value)) for key, value in changes.items()]
    return lines


def _describe_create(args: dict[str, Any]) -> str:
    if args.get("company"):
        return DESCRIBE_CREATE_AT(name=args["name"], email=args["email"], company=args["company"])
    return DESCRIBE_CREATE(name=args["name"], email=args["email"])


@toolset.tool(read_only=False, describe=_describe_create, check=_check_create, preview=_preview_create)
async def create_crm_lead(
    ctx: ToolContext,
    name: Annotated[str, Field(max_length=200)],
    email: Annotated[str, Field(max_length=320)],
    need: Annotated[str, Field(max_length=4000)],
    company: Annotated[str | None, Field(max_length=200)] = None,
) -> dict[str, Any]:
    """Create a sales lead in the CRM. If a lead with this e-mail already exists it is updated instead.

    Args:
        name: The person's full name.
        email: The person's e-mail address (one lead per address).
        need: What the person needs or asked about, in a sentence or two.
        company: The person's company, if known.
    """
    async with open_backend(ctx) as crm:
        outcome, lead = await crm.upsert(
            _fields({"name": name, "email": email, "need": need, "company": company}), approval_id=ctx.approval_id
        )
    message = DONE[outcome](lead_id=lead.id, crm=crm.name)
    return {"result": outcome, "message": message, "lead": lead.as_dict()}


@toolset.tool(read_only=True)
async def search_crm_leads(ctx: ToolContext, query: Annotated[str, Field(max_length=200)]) -> dict[str, Any]:
    """Search CRM leads by name, e-mail, company or need (at most 20 results).

    Args:
        query: Words to look for; an empty string lists the first leads.
    """
    async with open_backend(ctx) as crm:
        leads = await crm.search(query)
    return {"count": len(leads), "leads": [lead.as_dict() for lead in leads]}


def _changes(args: dict[str, Any]) -> dict[str, str]:
    return {key: args[key] for key in UPDATABLE if args.get(key) is not None}


async def _lead_or_refuse(ctx: ToolContext, lead_id: int) -> Lead:
    async with open_backend(ctx) as crm:
        lead = await crm.get(lead_id)
    if lead is None:
        raise ArgumentError(f"There is no lead #{lead_id}. Search for the lead first to get its id.")
    return lead


async def _check_update(ctx: ToolContext, args: dict[str, Any]) -> None:
    if not _changes(args):
        raise ArgumentError(f"Nothing to change: give at least one of {', '.join(UPDATABLE)}.")
    await _lead_or_refuse(ctx, args["lead_id"])


async def _preview_update(ctx: ToolContext, args: dict[str, Any]) -> list[str]:
    try:
        lead = await _lead_or_refuse(ctx, args["lead_id"])
    except Exception as exc:  # noqa: BLE001 - a preview must never stop the card
        return [READ_FAILED(lead_id=args["lead_id"], error=_error(exc))]
    lines: list[str] = [LEAD(label=lead.label())]
    lines += [CHANGE(field=key, old=_show(getattr(lead, key)), new=_show(value)) for key, value in _changes(args).items()]
    return lines


def _describe_update(args: dict[str, Any]) -> str:
    parts = [SET_FIELD(field=key, value=value) for key, value in _changes(args).items()]
    return DESCRIBE_UPDATE(lead_id=args["lead_id"], changes=Joined(parts))


@toolset.tool(read_only=False, describe=_describe_update, check=_check_update, preview=_preview_update)
async def update_crm_lead(
    ctx: ToolContext,
    lead_id: int,
    status: Status | None = None,
    need: Annotated[str | None, Field(max_length=4000)] = None,
    owner: Annotated[str | None, Field(max_length=200)] = None,
) -> dict[str, Any]:
    """Change an existing CRM lead's status, need or owner. Only the given fields change.

    Args:
        lead_id: The lead's id, as returned by search_crm_leads or create_crm_lead.
        status: The new status of the lead.
        need: The new description of what the person needs.
        owner: Who owns the lead (a name; for HubSpot an owner id or the owner's e-mail).
    """
    changes = _changes({"status": status, "need": need, "owner": owner})
    async with open_backend(ctx) as crm:
        lead = await crm.update(lead_id, changes)
    return {"result": "updated", "message": UPDATED(lead_id=lead.id, fields=", ".join(changes)), "lead": lead.as_dict()}
