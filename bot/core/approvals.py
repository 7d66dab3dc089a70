"""The approval service: the one owner of the approval state machine.

A pending approval near its expiry gets one reminder in its thread (`remind_near_expiry`, from the
sweeper; a once-only flag, not a state).

States (`ApprovalStatus`): pending -> approved | rejected | expired | cancelled;
approved -> executing -> succeeded | failed | in_doubt (approved -> cancelled when the call may no
longer run). Every transition is one conditional UPDATE (`WHERE status = ... [AND version = ...]`),
so exactly one decision wins; every transition queues the card update in the same transaction.
An edit (`edit`) is such an update too: pending stays pending with new arguments, a new digest,
`revision + 1`, the rule and preview computed again and the votes reset, so an edit racing a click
has exactly one winner, and a click carrying an older revision acts on nothing.
Nothing else writes an approval's status or arguments. Outcomes are returned, never rendered.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from bot.core import edit_form, i18n, metrics, outbox, texts
from bot.core.cards import card_content
from bot.core.channels import CardView
from bot.core.context import AppContext
from bot.core.display import one_line
from bot.core.events import DecisionRequest, EditRequest, User
from bot.core.policy import RULE_STRENGTH, CallRule
from storage.audit import canonical_json
from storage.models import Approval, ApprovalStatus
from storage.sessions import DbSession, rowcount
from tools.registry import CallProblem, PreparedCall

S = ApprovalStatus
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
MAX_ID_LENGTH = 40
REMIND_AT = 0.8  # a pending approval gets its one reminder after this share of its lifetime
REMIND_SCAN = 500


def new_approval_id() -> str:
    """Short enough to type in a terminal, long enough (~60 bits) never to be guessed."""
    return "ap-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def args_digest(args: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(args).encode("utf-8")).hexdigest()


def expiry(now: datetime, rule: CallRule, default_ttl: float) -> datetime:
    return now + timedelta(seconds=rule.ttl or default_ttl)


@dataclass(frozen=True)
class Vote:
    """One approver's click, as stored in `Approval.votes`."""

    user: User
    approve: bool
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.user.id,
            "key": self.user.key,
            "name": self.user.label,
            "user": self.user.to_dict(),
            "approve": self.approve,
            "at": self.at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vote:
        return cls(User.from_dict(data["user"]), bool(data["approve"]), datetime.fromisoformat(data["at"]))


def votes_of(approval: Approval) -> list[Vote]:
    return [Vote.from_dict(v) for v in approval.votes or []]


def editors_of(approval: Approval) -> tuple[User, ...]:
    """Everyone who edited the call: each counts as one of its requesters for separation of duties."""
    return tuple(User.from_dict(e["user"]) for e in approval.edits or [])


class Decision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"
    VOTE_RECORDED = "vote_recorded"
    ALREADY = "already"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    NOT_FOUND = "not_found"
    STALE = "stale"


@dataclass(frozen=True)
class DecisionOutcome:
    """What a click achieved; `message` is the text for the clicker (ephemeral / toast / terminal).
    The service leaves `card` empty; the engine adds the card view the adapter shows."""

    kind: Decision
    message: str
    card: CardView | None = None
    approval: Approval | None = None

    @property
    def changed(self) -> bool:
        return self.kind in (Decision.APPROVED, Decision.REJECTED, Decision.VOTE_RECORDED, Decision.EXPIRED)


class EditResult(StrEnum):
    FORM = "form"  # the form to show (an Edit click)
    EDITED = "edited"
    INVALID = "invalid"
    UNCHANGED = "unchanged"
    STALE = "stale"
    ALREADY = "already"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class EditOutcome:
    """What opening or submitting an edit achieved: the form to show, or the message for the editor
    and the problems by field (`edit_form.FORM_ERROR` for the form as a whole). The engine adds `card`."""

    kind: EditResult
    message: str = ""
    form: edit_form.EditForm | None = None
    errors: dict[str, str] | None = None
    card: CardView | None = None
    approval: Approval | None = None


@dataclass(frozen=True)
class _NewVersion:
    """A validated edit, ready to be stored (computed outside any transaction: previews do I/O)."""

    prepared: PreparedCall
    rule: CallRule
    preview: list[str]
    preview_ok: bool


async def transition(session: DbSession, approval_id: str, from_status: S | tuple[S, ...], **values: Any) -> bool:
    """UPDATE approval SET ... WHERE id = :id AND status IN (:from) [AND version = :version]."""
    allowed = (from_status,) if isinstance(from_status, str) else from_status
    where = [col(Approval.id) == approval_id, col(Approval.status).in_([str(s) for s in allowed])]
    if "expect_version" in values:
        where.append(Approval.version == values.pop("expect_version"))
    if "expect_executor" in values:
        where.append(Approval.executor == values.pop("expect_executor"))
    values["version"] = Approval.version + 1
    result = await session.execute(sa.update(Approval).where(*where).values(**values))
    return bool(rowcount(result))


def _already(approval: Approval) -> DecisionOutcome:
    who = approval.decided_by_name or approval.decided_by or "someone"
    if approval.status == S.EXPIRED:
        return DecisionOutcome(Decision.EXPIRED, texts.EXPIRED.format(at=texts.when(approval.expires_at)), approval=approval)
    if approval.decided_by and approval.status != S.CANCELLED:
        shown = S.APPROVED if approval.status in (S.EXECUTING, S.SUCCEEDED, S.FAILED, S.IN_DOUBT) else approval.status
        return DecisionOutcome(Decision.ALREADY, texts.ALREADY_DECIDED.format(status=shown, who=who), approval=approval)
    return DecisionOutcome(Decision.ALREADY, texts.ALREADY_FINISHED.format(status=approval.status), approval=approval)


class ApprovalService:
    """Creates approvals and moves them through their states; one per process."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._claiming: set[str] = set()  # approvals this process is claiming now (one claim at a time each)

    def rule_for(self, approval: Approval) -> CallRule:
        """The current policy rule for a stored approval (tools that vanished count as writes)."""
        spec = self.ctx.registry.get(approval.tool_name)
        if spec is None:
            return CallRule("confirm", "tool no longer registered")
        return self.ctx.policy.rule_for(spec, approval.args)

    # ------------------------------------------------------------------ decisions
    async def decide(self, req: DecisionRequest) -> DecisionOutcome:
        """Apply one click (optimistic concurrency: re-read and retry when another vote landed first)."""
        if len(req.approval_id) > MAX_ID_LENGTH or "\x00" in req.approval_id:
            return DecisionOutcome(Decision.NOT_FOUND, texts.NOT_FOUND.format(approval_id=req.approval_id[:MAX_ID_LENGTH]))
        for _ in range(8):
            outcome = await self.ctx.db.run(lambda session: self._decide_once(session, req), urgent=True)
            if outcome is not None:
                if outcome.kind in (Decision.APPROVED, Decision.REJECTED, Decision.EXPIRED):
                    metrics.APPROVALS.labels(str(outcome.kind)).inc()
                return outcome
        raise RuntimeError("approval decision did not settle after repeated conflicts")

    async def _decide_once(self, session: DbSession, req: DecisionRequest) -> DecisionOutcome | None:
        ctx = self.ctx
        approval = await session.get(Approval, req.approval_id)
        audit = ctx.audit
        if approval is None:
            await audit.record(
                session,
                "click_refused",
                approval_id=req.approval_id,
                platform=req.user.platform,
                actor=req.user.key,
                status="not_found",
            )
            return DecisionOutcome(Decision.NOT_FOUND, texts.NOT_FOUND.format(approval_id=req.approval_id))
        common = {"run_id": approval.run_id, "approval_id": approval.id, "platform": req.user.platform, "actor": req.user.key}
        common["tool"] = approval.tool_name
        if approval.status != S.PENDING:
            await audit.record(session, "click_refused", status=approval.status, reason="already decided", **common)
            return _already(approval)
        now = ctx.clock()
        if now >= approval.expires_at:
            if not await self._expire(session, approval):
                return None
            return DecisionOutcome(Decision.EXPIRED, texts.EXPIRED.format(at=texts.when(approval.expires_at)), approval=approval)
        if req.revision is not None and req.revision != approval.revision:
            await audit.record(session, "click_refused", status="stale", revision=req.revision, **common)
            return DecisionOutcome(Decision.STALE, texts.STALE_CARD, approval=approval)
        rule = self.rule_for(approval)
        votes = approval.votes or []
        requester = User.from_dict(approval.requester)
        verdict = ctx.policy.may_decide(rule, requester, req.user, list(votes), editors_of(approval))
        if not verdict.allowed:
            await audit.record(session, "click_refused", status="not_allowed", reason=verdict.reason, **common)
            return DecisionOutcome(Decision.NOT_ALLOWED, texts.NOT_ALLOWED.format(reason=verdict.reason), approval=approval)
        if req.approve and any(v.get("key") == req.user.key for v in votes):
            await audit.record(session, "click_refused", status="duplicate_vote", **common)
            return DecisionOutcome(Decision.ALREADY, texts.SAME_APPROVER_TWICE, approval=approval)
        new_votes = [*votes, Vote(req.user, req.approve, now).to_dict()]
        approvals_count = sum(1 for v in new_votes if v["approve"])
        status = S.REJECTED if not req.approve else S.APPROVED if approvals_count >= rule.votes_needed else S.PENDING
        values: dict[str, Any] = {"status": status, "votes": new_votes}
        if status != S.PENDING:
            reason = (req.reason or None) if not req.approve else None
            values.update(decided_by=req.user.id, decided_by_name=req.user.label, decided_at=now, decision_reason=reason)
        if not await transition(session, approval.id, S.PENDING, expect_version=approval.version, **values):
            return None
        kind = "approval_decided" if status != S.PENDING else "approval_vote"
        await audit.record(session, kind, status=status, reason=req.reason, votes_needed=rule.votes_needed, **common)
        await outbox.enqueue_card_update(session, ctx, approval)
        await session.refresh(approval)
        if status == S.APPROVED:
            return DecisionOutcome(Decision.APPROVED, texts.DECIDED_APPROVED.format(tool=approval.tool_name), approval=approval)
        if status == S.REJECTED:
            return DecisionOutcome(Decision.REJECTED, texts.DECIDED_REJECTED, approval=approval)
        remaining = rule.votes_needed - approvals_count
        return DecisionOutcome(Decision.VOTE_RECORDED, texts.VOTE_RECORDED.format(remaining=remaining), approval=approval)

    async def _expire(self, session: DbSession, approval: Approval) -> bool:
        return await self._end_pending(session, approval, S.EXPIRED, "approval_expired")

    async def _end_pending(
        self,
        session: DbSession,
        approval: Approval,
        status: S,
        kind: str,
        *,
        reason: str | None = None,
        actor: str | None = None,
    ) -> bool:
        """pending -> `status` (expired, cancelled) with its audit row and card update; False if it moved on."""
        values: dict[str, Any] = {"status": status} if reason is None else {"status": status, "decision_reason": reason}
        if not await transition(session, approval.id, S.PENDING, expect_version=approval.version, **values):
            return False
        said = {} if reason is None else {"reason": reason}
        await self.ctx.audit.record(
            session, kind, run_id=approval.run_id, approval_id=approval.id, tool=approval.tool_name, status=status,
            actor=actor, **said,
        )  # fmt: skip
        approval.status = status
        await outbox.enqueue_card_update(session, self.ctx, approval)
        return True

    # ------------------------------------------------------------------ edits
    async def open_edit(self, req: EditRequest) -> EditOutcome:
        """The form for an Edit click, or why this person may not edit (nothing is written)."""
        approval = await self._read(req.approval_id)
        refusal = self._edit_refusal(approval, req)
        if refusal is not None or approval is None:
            return refusal or EditOutcome(EditResult.NOT_FOUND)
        spec = self.ctx.registry.get(approval.tool_name)
        assert spec is not None  # _edit_refusal refuses a vanished tool
        requester = approval.requester or {}
        form = edit_form.build_form(
            approval.id, approval.revision, spec, approval.args, lang=requester.get("lang"), tz=requester.get("tz")
        )
        return EditOutcome(EditResult.FORM, form=form, approval=approval)

    async def edit(self, req: EditRequest) -> EditOutcome:
        """Store the submitted arguments as the approval's next revision, after checking them as the
        model's were (schema, tool check, policy) and computing the preview again."""
        approval = await self._read(req.approval_id)
        refusal = self._edit_refusal(approval, req)
        if refusal is not None or approval is None:
            return refusal or EditOutcome(EditResult.NOT_FOUND)
        checked = await self._check_edit(approval, req.values or {})
        if isinstance(checked, EditOutcome):
            return checked
        for _ in range(8):
            outcome = await self.ctx.db.run(
                lambda session: self._edit_once(session, req, approval.revision, checked), urgent=True
            )
            if outcome is not None:
                return outcome
        raise RuntimeError("approval edit did not settle after repeated conflicts")

    async def _read(self, approval_id: str) -> Approval | None:
        if len(approval_id) > MAX_ID_LENGTH or "\x00" in approval_id:
            return None
        return await self.ctx.db.run(lambda session: session.get(Approval, approval_id), read=True)

    def _edit_refusal(self, approval: Approval | None, req: EditRequest) -> EditOutcome | None:
        """Why `req` may not edit this approval now, or None."""
        if approval is None:
            return EditOutcome(EditResult.NOT_FOUND, texts.NOT_FOUND.format(approval_id=req.approval_id[:MAX_ID_LENGTH]))
        if approval.status != S.PENDING:
            return EditOutcome(EditResult.ALREADY, texts.EDIT_DECIDED.format(status=approval.status), approval=approval)
        if self.ctx.clock() >= approval.expires_at:
            return EditOutcome(EditResult.EXPIRED, texts.EXPIRED.format(at=texts.when(approval.expires_at)), approval=approval)
        if req.revision is not None and req.revision != approval.revision:
            return EditOutcome(EditResult.STALE, str(texts.STALE_CARD), approval=approval)
        if self.ctx.registry.get(approval.tool_name) is None:
            return EditOutcome(EditResult.NOT_ALLOWED, texts.EDIT_TOOL_GONE.format(tool=approval.tool_name), approval=approval)
        verdict = self.ctx.policy.may_edit(self.rule_for(approval), User.from_dict(approval.requester), req.user)
        if not verdict.allowed:
            return EditOutcome(EditResult.NOT_ALLOWED, texts.EDIT_NOT_ALLOWED.format(reason=verdict.reason), approval=approval)
        return None

    async def _check_edit(self, approval: Approval, values: dict[str, Any]) -> _NewVersion | EditOutcome:
        """Typed values -> arguments validated against the tool's schema, its own check and the policy;
        then the preview. Any problem comes back as an `invalid` outcome naming the field."""
        ctx = self.ctx
        spec = ctx.registry.get(approval.tool_name)
        assert spec is not None
        form = edit_form.build_form(approval.id, approval.revision, spec, approval.args)
        args, errors = edit_form.read_values(form, approval.args, values)
        prepared: PreparedCall | CallProblem | None = None
        if not errors:
            prepared = ctx.registry.prepare(spec.name, canonical_json(args))
            if isinstance(prepared, CallProblem):
                errors = edit_form.schema_errors(form, prepared.details, prepared.message)
        if errors or not isinstance(prepared, PreparedCall):
            return EditOutcome(EditResult.INVALID, str(texts.EDIT_INVALID_FORM), errors=errors, approval=approval)
        if prepared.args == approval.args:
            return EditOutcome(EditResult.UNCHANGED, str(texts.EDIT_UNCHANGED), approval=approval)
        rule = ctx.policy.rule_for(spec, prepared.args)
        if rule.rule == "deny":
            problem = texts.EDIT_DENIED.format(reason=rule.reason)
            return EditOutcome(EditResult.INVALID, problem, errors={edit_form.FORM_ERROR: problem}, approval=approval)
        tool_ctx = ctx.tool_context.for_call(approval_id=None, requester=User.from_dict(approval.requester))
        if (refused := await ctx.registry.check(tool_ctx, prepared)) is not None:
            errors = edit_form.schema_errors(form, refused.details, refused.message)
            return EditOutcome(EditResult.INVALID, str(texts.EDIT_INVALID_FORM), errors=errors, approval=approval)
        preview, ok = await edit_form.preview_lines(tool_ctx, prepared, ctx.settings.tool_timeout)
        return _NewVersion(prepared, rule, preview, ok)

    async def _edit_once(self, session: DbSession, req: EditRequest, revision: int, new: _NewVersion) -> EditOutcome | None:
        """The edit as one conditional UPDATE on (status pending, version, revision); None: retry."""
        ctx = self.ctx
        approval = await session.get(Approval, req.approval_id)
        if approval is None:
            return EditOutcome(EditResult.NOT_FOUND, texts.NOT_FOUND.format(approval_id=req.approval_id))
        common = {"run_id": approval.run_id, "approval_id": approval.id, "platform": req.user.platform}
        common.update(actor=req.user.key, tool=approval.tool_name)
        if (refusal := self._edit_refusal(approval, EditRequest(req.approval_id, req.user, revision))) is not None:
            await ctx.audit.record(session, "edit_refused", status=str(refusal.kind), **common)
            return refusal
        args, spec, now, before_rule = new.prepared.args, new.prepared.spec, ctx.clock(), approval.rule
        card = card_content(
            spec.sentence(args), args, list(new.rule.risks), new.preview, new.rule.reason, nulls=spec.nulls_are_sent
        )
        changes, before_sha, before_votes = edit_form.diff(approval.args, args), approval.args_sha256, len(approval.votes or [])
        edit = {"user": req.user.to_dict(), "at": now.isoformat(), "revision": revision + 1}
        edit["fields"] = [c["field"] for c in changes]
        changed = await transition(
            session, approval.id, S.PENDING, expect_version=approval.version, args=args, args_sha256=args_digest(args),
            revision=revision + 1, votes=[], rule=new.rule.rule, card=ctx.redactor.redact(card),
            preview_facts={"lines": new.preview} if new.preview_ok else None, edits=[*(approval.edits or []), edit],
        )  # fmt: skip
        if not changed:
            return None
        await ctx.audit.record(
            session, "approval_edited", status=S.PENDING, revision=revision + 1, changes=changes,
            args_sha256=args_digest(args), previous_sha256=before_sha, rule=new.rule.rule,
            previous_rule=before_rule, votes_reset=before_votes, **common,
        )  # fmt: skip
        await outbox.enqueue_card_update(session, ctx, approval)
        await session.refresh(approval)
        escalated = RULE_STRENGTH.get(new.rule.rule, 0) > RULE_STRENGTH.get(before_rule, 0)
        message = texts.EDITED_ESCALATED.format(rule=new.rule.rule) if escalated else texts.EDITED
        return EditOutcome(EditResult.EDITED, str(message), approval=approval)

    # ------------------------------------------------------------------ execution bookkeeping
    async def start_execution(self, approval_id: str, problem_before: str | None = None) -> Approval | None:
        """approved -> executing under this replica's lease, after re-checking that the call may
        still run (tool present, authorisation, digest, `problem_before` from the preview re-check).
        Returns the approval when this replica must run it, else None."""
        if approval_id in self._claiming:
            return None  # this process is claiming it already (a wake-up and a sweep at once)
        self._claiming.add(approval_id)
        claim: dict[str, int] = {}
        try:
            started = await self.ctx.db.run(lambda session: self._start_execution(session, approval_id, problem_before, claim))
        finally:
            self._claiming.discard(approval_id)
        if started is not None:
            metrics.APPROVALS.labels(str(S.EXECUTING)).inc()
        return started

    async def _start_execution(
        self, session: DbSession, approval_id: str, problem_before: str | None, claim: dict[str, int]
    ) -> Approval | None:
        """One attempt. `claim` remembers the version an earlier attempt claimed from: a COMMIT given up
        as stalled may land after all, and the call, `executing` under this replica one version on, is
        then this claim's (its lease renewed now), not someone else's to leave alone."""
        ctx = self.ctx
        approval = await session.get(Approval, approval_id)
        if approval is not None and self._landed(approval, claim):
            return await self._renew_landed(session, approval)
        if approval is None or approval.status != S.APPROVED:
            return None
        common = {
            "run_id": approval.run_id,
            "approval_id": approval.id,
            "platform": approval.platform,
            "tool": approval.tool_name,
        }
        problem = self._execution_problem(approval) or problem_before
        now = ctx.clock()
        if problem is not None:
            if await transition(session, approval.id, S.APPROVED, status=S.CANCELLED, decision_reason=problem, finished_at=now):
                await ctx.audit.record(session, "execution_blocked", status=S.CANCELLED, reason=problem, **common)
                await outbox.enqueue_card_update(session, ctx, approval)
            return None
        lease = now + timedelta(seconds=ctx.settings.lease_seconds)
        claim["version"] = approval.version
        started = await transition(
            session, approval.id, S.APPROVED, status=S.EXECUTING, executor=ctx.replica_id, exec_started_at=now, lease_until=lease,
            expect_version=approval.version,
        )  # fmt: skip
        if not started:
            # Blocked behind an earlier attempt's COMMIT that landed meanwhile? Then the claim is ours.
            now_stored = (await session.execute(sa.select(Approval).where(col(Approval.id) == approval_id)
                                                .execution_options(populate_existing=True))).scalar_one_or_none()  # fmt: skip
            if now_stored is not None and self._landed(now_stored, claim):
                return await self._renew_landed(session, now_stored)
            return None
        await ctx.audit.record(
            session, "execution_started", status=S.EXECUTING, actor=ctx.replica_id, args_sha256=approval.args_sha256, **common
        )
        await outbox.enqueue_card_update(session, ctx, approval)
        return approval

    async def _renew_landed(self, session: DbSession, approval: Approval) -> Approval | None:
        """This process's claim landed after its attempt was given up: renew its lease; it runs here."""
        lease = self.ctx.clock() + timedelta(seconds=self.ctx.settings.lease_seconds)
        renewed = await transition(
            session,
            approval.id,
            S.EXECUTING,
            expect_executor=self.ctx.replica_id,
            expect_version=approval.version,
            lease_until=lease,
        )
        return approval if renewed else None

    def _landed(self, approval: Approval, claim: dict[str, int]) -> bool:
        """This process's earlier attempt claimed the call after all (see `_start_execution`)."""
        return (
            "version" in claim
            and approval.status == S.EXECUTING
            and approval.executor == self.ctx.replica_id
            and approval.version == claim["version"] + 1
        )

    def _execution_problem(self, approval: Approval) -> str | None:
        ctx = self.ctx
        if ctx.registry.get(approval.tool_name) is None:
            return f"the tool {approval.tool_name} is no longer available"
        approvers = [v.user for v in votes_of(approval) if v.approve]
        requester = User.from_dict(approval.requester)
        verdict = ctx.policy.still_authorised(self.rule_for(approval), requester, approvers, editors_of(approval))
        if not verdict.allowed:
            return verdict.reason
        if args_digest(approval.args) != approval.args_sha256:
            return "the stored arguments no longer match what was approved"
        return None

    async def renew_execution(self, approval_id: str) -> bool:
        """Extend this replica's execution lease; False when the execution is no longer ours."""
        ctx = self.ctx

        async def renew(session: DbSession) -> bool:
            result = await session.execute(
                sa.update(Approval)
                .where(
                    col(Approval.id) == approval_id, col(Approval.status) == S.EXECUTING, col(Approval.executor) == ctx.replica_id
                )
                .values(lease_until=ctx.clock() + timedelta(seconds=ctx.settings.lease_seconds))
            )
            return bool(rowcount(result))

        return await ctx.db.run(renew, deadline=ctx.settings.lease_seconds / 3)

    async def finish_execution(self, approval_id: str, status: S, outcome: str) -> Approval | None:
        """executing -> succeeded | failed | in_doubt, by the replica that ran it. An execution the
        sweeper already marked `in_doubt` (its lease ran out while the database was away) gets its
        real outcome now: what was sent is recorded as sent, and the thread is told."""
        ctx = self.ctx
        outcome = ctx.redactor.redact_text(outcome)

        async def finish(session: DbSession) -> Approval | None:
            approval = await session.get(Approval, approval_id)
            if approval is None:
                return None
            late = approval.status == S.IN_DOUBT
            changed = await transition(
                session,
                approval_id,
                (S.EXECUTING, S.IN_DOUBT),
                expect_executor=ctx.replica_id,
                status=status,
                outcome=outcome,
                finished_at=ctx.clock(),
                lease_until=None,
            )
            if not changed:
                return None
            common = {"run_id": approval.run_id, "approval_id": approval.id, "platform": approval.platform}
            requester = User.from_dict(approval.requester).key if approval.requester else None  # it ran for them
            await ctx.audit.record(
                session, "tool_executed", actor=requester, tool=approval.tool_name, status=status, result=outcome[:4000], **common
            )
            await outbox.enqueue_card_update(session, ctx, approval)
            if late and status != S.IN_DOUBT:
                notice = texts.IN_DOUBT_RESOLVED.format(tool=approval.tool_name, approval_id=approval.id, status=status)
                await outbox.enqueue_reply(session, ctx, approval.thread, notice, run_id=approval.run_id)
            return approval

        finished = await ctx.db.run(finish, deadline=ctx.settings.outbox_deadline)
        if finished is not None:
            metrics.APPROVALS.labels(str(status)).inc()
        return finished

    # ------------------------------------------------------------------ recovery (the sweeper's)
    async def expire_overdue(self) -> list[Approval]:
        """pending -> expired for every approval past its expiry."""
        ctx = self.ctx

        async def expire(session: DbSession) -> list[Approval]:
            rows = await session.execute(
                sa.select(Approval).where(col(Approval.status) == S.PENDING, col(Approval.expires_at) <= ctx.clock()).limit(200)
            )
            return [a for a in rows.scalars().all() if await self._expire(session, a)]

        expired = await ctx.db.run(expire)
        metrics.APPROVALS.labels(str(S.EXPIRED)).inc(len(expired))
        return expired

    async def in_doubt_after_lease(self) -> list[Approval]:
        """executing -> in_doubt where the executor's lease ran out: the outcome is unknown, so the
        call is reported and never re-run."""
        ctx = self.ctx
        detail = texts.english(texts.OUTCOME_EXECUTOR_LOST)

        async def mark(session: DbSession) -> list[Approval]:
            now = ctx.clock()
            rows = await session.execute(
                sa.select(Approval).where(
                    col(Approval.status) == S.EXECUTING,
                    sa.or_(col(Approval.lease_until).is_(None), col(Approval.lease_until) < now),
                )
            )
            marked = []
            for a in rows.scalars().all():
                if not await transition(session, a.id, S.EXECUTING, expect_version=a.version, status=S.IN_DOUBT, outcome=detail):
                    continue
                common = {"run_id": a.run_id, "approval_id": a.id, "tool": a.tool_name}
                await ctx.audit.record(session, "execution_in_doubt", status=S.IN_DOUBT, executor=a.executor, **common)
                await outbox.enqueue_card_update(session, ctx, a)
                report = texts.IN_DOUBT_REPORT.format(tool=a.tool_name, approval_id=a.id)
                await outbox.enqueue_reply(session, ctx, a.thread, report, run_id=a.run_id)
                marked.append(a)
            return marked

        marked = await ctx.db.run(mark)
        metrics.APPROVALS.labels(str(S.IN_DOUBT)).inc(len(marked))
        metrics.LEASE_TAKEOVERS.labels("execution").inc(len(marked))
        return marked

    async def approved_but_not_started(self, older_than: float) -> list[str]:
        """Approvals a decider approved but nobody started (the decider died or lost the database)."""
        ctx = self.ctx
        cutoff = ctx.clock() - timedelta(seconds=older_than)

        async def find(session: DbSession) -> list[str]:
            rows = await session.execute(
                sa.select(col(Approval.id)).where(col(Approval.status) == S.APPROVED, col(Approval.decided_at) <= cutoff)
            )
            return list(rows.scalars().all())

        return await ctx.db.run(find, read=True)

    async def remind_near_expiry(self) -> list[Approval]:
        """Queue one reminder in the thread of each pending approval past `REMIND_AT` of its lifetime.
        The flag is set by a conditional UPDATE (`reminded_at IS NULL`), so across replicas and sweeps
        exactly one reminder is queued, in the same transaction as the flag and its audit row."""
        ctx = self.ctx

        async def remind(session: DbSession) -> list[Approval]:
            now = ctx.clock()
            rows = await session.execute(
                sa.select(Approval)
                .where(col(Approval.status) == S.PENDING, col(Approval.reminded_at).is_(None), col(Approval.expires_at) > now)
                .order_by(col(Approval.expires_at))
                .limit(REMIND_SCAN)
            )
            due = [a for a in rows.scalars().all() if now >= a.created_at + (a.expires_at - a.created_at) * REMIND_AT]
            reminded = []
            for a in due:
                flagged = await session.execute(
                    sa.update(Approval)
                    .where(col(Approval.id) == a.id, col(Approval.status) == S.PENDING, col(Approval.reminded_at).is_(None))
                    .values(reminded_at=now)
                )
                if not rowcount(flagged):
                    continue  # another replica (or a decision) got there first
                requester = a.requester or {}
                with i18n.speaking(requester.get("lang"), requester.get("tz")):
                    summary = one_line((a.card or {}).get("summary") or a.tool_name)[:200]
                    notice = texts.EXPIRY_REMINDER.format(
                        approval_id=a.id, tool=a.tool_name, summary=summary, at=texts.when(a.expires_at)
                    )
                await outbox.enqueue_reply(session, ctx, a.thread, notice, run_id=a.run_id)
                await ctx.audit.record(
                    session, "approval_reminded", run_id=a.run_id, approval_id=a.id, tool=a.tool_name, status=S.PENDING,
                    expires_at=a.expires_at.isoformat(),
                )  # fmt: skip
                reminded.append(a)
            return reminded

        return await ctx.db.run(remind)

    async def cancel_pending(
        self, session: DbSession, where: sa.ColumnElement[bool], reason: str, *, actor: str | None = None
    ) -> list[Approval]:
        """pending -> cancelled for the approvals matching `where`, inside the caller's transaction
        (`actor`: who cancelled them, when a person did)."""
        rows = (await session.execute(sa.select(Approval).where(col(Approval.status) == S.PENDING, where))).scalars().all()
        cancelled = []
        for a in rows:
            if await self._end_pending(session, a, S.CANCELLED, "approval_cancelled", reason=reason, actor=actor):
                cancelled.append(a)
        return cancelled


def model_result(approval: Approval) -> str:
    """What the model reads for a decided call; for an edited call, first who edited it and the
    final arguments (what ran, or would have)."""
    result = _decided_result(approval)
    if not approval.edits:
        return result
    names = ", ".join(dict.fromkeys(User.from_dict(e["user"]).label for e in approval.edits))
    return texts.MODEL_EDITED.format(who=names, args=canonical_json(approval.args)) + "\n" + result


def _decided_result(approval: Approval) -> str:
    who = approval.decided_by_name or approval.decided_by or "someone"
    match approval.status:
        case S.SUCCEEDED:
            return approval.outcome or "ok"
        case S.FAILED:
            return texts.MODEL_FAILED_TOOL.format(detail=approval.outcome or "error")
        case S.IN_DOUBT:
            return texts.MODEL_IN_DOUBT.format(detail=approval.outcome or "interrupted")
        case S.REJECTED:
            if approval.decision_reason:
                return texts.MODEL_REJECTED.format(who=who, reason=approval.decision_reason)
            return texts.MODEL_REJECTED_NO_REASON.format(who=who)
        case S.EXPIRED:
            return texts.MODEL_EXPIRED
        case S.CANCELLED:
            return texts.MODEL_CANCELLED.format(reason=approval.decision_reason or "cancelled")
    raise ValueError(f"approval {approval.id} is not decided ({approval.status})")
