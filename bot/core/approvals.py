"""Approvals: creating the frozen record, and every state transition as one conditional UPDATE.

States: pending -> approved | rejected | expired | cancelled;
approved -> executing -> succeeded | failed | in_doubt (approved -> cancelled when authorisation
was revoked before execution). A transition succeeds only if the row is still in the state the
caller saw (`WHERE status = ... [AND version = ...]`), so exactly one decision wins.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core import texts
from bot.core.cards import card_view
from bot.core.channels import CardView
from bot.core.context import AppContext
from bot.core.events import DecisionRequest, User
from bot.core.policy import CallRule
from storage.audit import canonical_json
from storage.models import Approval

TERMINAL = frozenset({"rejected", "expired", "cancelled", "succeeded", "failed", "in_doubt"})
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_approval_id() -> str:
    """Short enough to type in a terminal, long enough (~60 bits) never to be guessed."""
    return "ap-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def args_digest(args: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(args).encode("utf-8")).hexdigest()


async def transition(session: AsyncSession, approval_id: str, from_status: str | tuple[str, ...], **values: Any) -> bool:
    """UPDATE approval SET ... WHERE id = :id AND status IN (:from) [AND version = :version]."""
    allowed = (from_status,) if isinstance(from_status, str) else from_status
    where = [Approval.id == approval_id, Approval.status.in_(allowed)]
    if "expect_version" in values:
        where.append(Approval.version == values.pop("expect_version"))
    values["version"] = Approval.version + 1
    result = await session.execute(sa.update(Approval).where(*where).values(**values))
    return result.rowcount == 1  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DecisionOutcome:
    """What a click achieved; `message` is the text for the clicker (ephemeral / toast / terminal)."""

    kind: Literal["approved", "rejected", "vote_recorded", "already", "expired", "not_allowed", "not_found"]
    message: str
    card: CardView | None = None
    approval: Approval | None = None

    @property
    def changed(self) -> bool:
        return self.kind in ("approved", "rejected", "vote_recorded", "expired")


def _who(approval: Approval) -> str:
    return approval.decided_by_name or approval.decided_by or "someone"


def _already(approval: Approval) -> DecisionOutcome:
    if approval.status == "expired":
        return DecisionOutcome("expired", texts.EXPIRED.format(at=texts.when(approval.expires_at)), card_view(approval), approval)
    if approval.decided_by and approval.status != "cancelled":
        shown = {"executing": "approved", "succeeded": "approved", "failed": "approved", "in_doubt": "approved"}
        status = shown.get(approval.status, approval.status)
        return DecisionOutcome(
            "already", texts.ALREADY_DECIDED.format(status=status, who=_who(approval)), card_view(approval), approval
        )
    return DecisionOutcome("already", texts.ALREADY_FINISHED.format(status=approval.status), card_view(approval), approval)


async def decide(ctx: AppContext, req: DecisionRequest, rule_for: Any) -> DecisionOutcome:
    """Apply one decision. `rule_for(approval)` returns the current `CallRule` for the approval."""
    for _ in range(8):  # optimistic concurrency: re-read and retry when another vote landed first
        async with ctx.db.transaction(urgent=True) as session:
            approval = await session.get(Approval, req.approval_id)
            if approval is None:
                await ctx.audit.record(
                    session,
                    "click_refused",
                    approval_id=req.approval_id,
                    platform=req.user.platform,
                    actor=req.user.key,
                    status="not_found",
                )
                return DecisionOutcome("not_found", texts.NOT_FOUND.format(approval_id=req.approval_id))
            common = {
                "run_id": approval.run_id,
                "approval_id": approval.id,
                "platform": req.user.platform,
                "actor": req.user.key,
                "tool": approval.tool_name,
            }
            if approval.status != "pending":
                await ctx.audit.record(session, "click_refused", status=approval.status, reason="already decided", **common)
                return _already(approval)
            now = ctx.clock()
            if now >= approval.expires_at:
                if await transition(session, approval.id, "pending", expect_version=approval.version, status="expired"):
                    await ctx.audit.record(session, "approval_expired", status="expired", **common)
                    approval.status = "expired"
                    return DecisionOutcome(
                        "expired", texts.EXPIRED.format(at=texts.when(approval.expires_at)), card_view(approval), approval
                    )
                continue
            rule: CallRule = rule_for(approval)
            requester = User.from_dict(approval.requester)
            verdict = ctx.policy.may_decide(rule, requester, req.user, list(approval.votes or []))
            if not verdict.allowed:
                await ctx.audit.record(session, "click_refused", status="not_allowed", reason=verdict.reason, **common)
                return DecisionOutcome(
                    "not_allowed", texts.NOT_ALLOWED.format(reason=verdict.reason), card_view(approval), approval
                )
            vote = {
                "id": req.user.id,
                "key": req.user.key,
                "name": req.user.label,
                "user": req.user.to_dict(),
                "approve": req.approve,
                "at": now.isoformat(),
            }
            votes = list(approval.votes or [])
            if req.approve and any(v.get("key") == req.user.key for v in votes):
                await ctx.audit.record(session, "click_refused", status="duplicate_vote", **common)
                return DecisionOutcome("already", texts.SAME_APPROVER_TWICE, card_view(approval), approval)
            votes.append(vote)
            approvals_count = sum(1 for v in votes if v["approve"])
            if not req.approve:
                status = "rejected"
            elif approvals_count >= rule.votes_needed:
                status = "approved"
            else:
                status = "pending"
            values: dict[str, Any] = {"status": status, "votes": votes}
            if status != "pending":
                values.update(
                    decided_by=req.user.id,
                    decided_by_name=req.user.label,
                    decided_at=now,
                    decision_reason=(req.reason or None) if not req.approve else None,
                )
            if not await transition(session, approval.id, "pending", expect_version=approval.version, **values):
                continue
            await ctx.audit.record(
                session,
                "approval_decided" if status != "pending" else "approval_vote",
                status=status,
                reason=req.reason,
                votes_needed=rule.votes_needed,
                **common,
            )
            approval = await session.get(Approval, approval.id, populate_existing=True)
            assert approval is not None
        if status == "approved":
            message = texts.DECIDED_APPROVED.format(tool=approval.tool_name)
            return DecisionOutcome("approved", message, card_view(approval), approval)
        if status == "rejected":
            return DecisionOutcome("rejected", texts.DECIDED_REJECTED, card_view(approval), approval)
        remaining = rule.votes_needed - approvals_count
        return DecisionOutcome("vote_recorded", texts.VOTE_RECORDED.format(remaining=remaining), card_view(approval), approval)
    raise RuntimeError("approval decision did not settle after repeated conflicts")


def expiry(now: datetime, rule: CallRule, default_ttl: float) -> datetime:
    return now + timedelta(seconds=rule.ttl or default_ttl)


def model_result(approval: Approval) -> str:
    """What the model reads for a decided call."""
    who = approval.decided_by_name or approval.decided_by or "someone"
    match approval.status:
        case "succeeded":
            return approval.outcome or "ok"
        case "failed":
            return texts.MODEL_FAILED_TOOL.format(detail=approval.outcome or "error")
        case "in_doubt":
            return texts.MODEL_IN_DOUBT.format(detail=approval.outcome or "interrupted")
        case "rejected":
            if approval.decision_reason:
                return texts.MODEL_REJECTED.format(who=who, reason=approval.decision_reason)
            return texts.MODEL_REJECTED_NO_REASON.format(who=who)
        case "expired":
            return texts.MODEL_EXPIRED
        case "cancelled":
            return texts.MODEL_CANCELLED.format(reason=approval.decision_reason or "cancelled")
    raise ValueError(f"approval {approval.id} is not decided ({approval.status})")
