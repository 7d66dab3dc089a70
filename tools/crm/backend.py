"""What every CRM backend offers the CRM tools (the choice between them, CHATOPS_CRM, is `choice`).

A backend speaks in `Lead`s and `LeadFields`; it never sees the model or the approval flow.
Both backends keep one lead per (lower-cased) e-mail address: `upsert` updates the existing
lead instead of creating a duplicate, so re-running an approved creation is harmless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, get_args

from tools.phrases import Sentence

Outcome = Literal["created", "updated", "unchanged"]
Status = Literal["new", "open", "in_progress", "open_deal", "unqualified", "attempted_to_contact", "connected", "bad_timing"]
"""Lead statuses: HubSpot's `hs_lead_status` values, lower-cased; the built-in CRM uses the same set."""
STATUSES: tuple[str, ...] = get_args(Status)
SEARCH_LIMIT = 20

# What a backend's failures say (the model reads the English; a decided card shows them translated)
CHANGED_CONCURRENTLY = Sentence("crm.CHANGED_CONCURRENTLY", "Could not save the lead for {email}: it kept changing concurrently.")
NO_SUCH_LEAD = Sentence("crm.NO_SUCH_LEAD", "There is no lead #{lead_id} in {crm}. Search for the lead first to get its id.")
BUILTIN_NAME = Sentence("crm.BUILTIN_NAME", "the built-in CRM")
NO_HUBSPOT_TOKEN = Sentence(
    "crm.NO_HUBSPOT_TOKEN", "The HubSpot CRM is selected (CHATOPS_CRM=hubspot) but HUBSPOT_TOKEN is not set."
)
NO_DATABASE = Sentence("crm.NO_DATABASE", "The built-in CRM has no database in this process.")


@dataclass(frozen=True, kw_only=True)
class Lead:
    """A lead as the tools show it, whatever the backend."""

    id: int
    name: str
    email: str
    need: str = ""
    company: str | None = None
    status: str | None = None
    owner: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        return f"#{self.id} ({self.name} <{self.email}>)"


@dataclass(frozen=True, kw_only=True)
class LeadFields:
    """The fields a creation sets; `None` means "leave as it is" for an existing lead."""

    name: str
    email: str
    need: str
    company: str | None = None

    def changes_for(self, lead: Lead) -> dict[str, str]:
        """The fields that would change if these values were written over `lead`."""
        wanted = {"name": self.name, "need": self.need, "company": self.company}
        return {k: v for k, v in wanted.items() if v is not None and v != getattr(lead, k)}


class CrmBackend(Protocol):
    """The operations the CRM tools need. Errors are `ToolError`s the model can read."""

    name: str

    async def get(self, lead_id: int) -> Lead | None:
        """The lead with this id, or None."""

    async def find_by_email(self, email: str) -> Lead | None:
        """The lead with this (normalised) e-mail address, or None."""

    async def search(self, query: str) -> list[Lead]:
        """Leads whose name, e-mail, company or need contain `query` (at most SEARCH_LIMIT)."""

    async def upsert(self, fields: LeadFields, *, approval_id: str | None) -> tuple[Outcome, Lead]:
        """Create the lead, or update the one with the same e-mail. Never makes a duplicate."""

    async def update(self, lead_id: int, changes: dict[str, str]) -> Lead:
        """Apply `changes` (status, need, owner) to an existing lead."""


def normalise_email(email: str) -> str:
    return email.strip().lower()
