"""Who a change to an approval concerns on their home view (Slack's App Home): its requester, whoever
voted on it, and the approvers the policy names by user id (members of an approver group are not
listed anywhere, so they see the change when they next open their home). No imports from the rest
of the core beyond the context: the outbox uses it inside the transaction of every approval change.
"""

from __future__ import annotations

from typing import Any

from bot.core.context import AppContext
from storage.models import Approval

HOME_PLATFORMS = frozenset({"slack"})  # platforms whose adapter shows a home view


def concerned(ctx: AppContext, approval: Approval) -> list[dict[str, Any]]:
    """The people whose home shows `approval`: requester, voters, approvers the policy names by id."""
    requester = approval.requester or {}
    people: dict[str, dict[str, Any]] = {}
    if requester.get("id"):
        people[str(requester["id"])] = {"user": str(requester["id"]), "team": requester.get("tenant")}
    for vote in approval.votes or []:
        voter = vote.get("user") or {}
        if voter.get("id"):
            people.setdefault(str(voter["id"]), {"user": str(voter["id"]), "team": voter.get("tenant")})
    spec = ctx.registry.get(approval.tool_name)
    rule = ctx.policy.rule_for(spec, approval.args) if spec is not None else None
    for entry in rule.approvers if rule is not None else ():
        kind, _, rest = entry.partition(":")
        tenant, _, ident = rest.rpartition(":")
        if kind == approval.platform and ident and ident != "*":
            people.setdefault(ident, {"user": ident, "team": tenant or requester.get("tenant")})
    return list(people.values())
