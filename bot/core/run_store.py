"""All SQL of a run: claiming a conversation's queued messages into a run, recording each step,
pausing on approvals, resuming, finishing, failing, and the leases that say who works on a run.
The statements on the run, conversation and inbox rows are `run_rows`'.

Every method is one transaction through `Database.run` (retried on transient faults from the
start, so each body is safe to run twice), but `defer_step`, which keeps a young run's read-only
step for its next write. A run is claimed with `version + 1` and a lease; every later write checks
that version, so a replica that lost its lease changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from bot.core import i18n, limits, metrics, outbox, run_rows, texts
from bot.core.approvals import ApprovalService, args_digest, expiry, model_result, new_approval_id
from bot.core.cards import card_content
from bot.core.context import AppContext
from bot.core.events import IncomingMessage, Thread, User
from bot.core.policy import CallRule, Verdict
from bot.core.run_rows import ConversationRow, QueuedMessage
from storage.audit import Entry, entry
from storage.models import (
    Approval,
    ApprovalStatus,
    Conversation,
    InboxEvent,
    InboxStatus,
    OutboxJob,
    OutboxStatus,
    Run,
    RunStatus,
)
from storage.sessions import DbSession, rowcount
from tools.registry import PreparedCall

R, S, Q = RunStatus, ApprovalStatus, InboxStatus


@dataclass
class RunClaim:
    """A run this replica works on, with everything a turn needs; `version` fences its writes."""

    run_id: str
    version: int
    conversation_key: str
    step: int
    thread: Thread
    requester: User
    channel_id: str | None
    messages: list[dict[str, Any]]
    progress_from: datetime | None = None  # a working line waits until then (`CHATOPS_PROGRESS_AFTER`)
    opening_line: str | None = None  # a resumed run's first working line, held like every other
    lost: bool = False  # a lease renewal found the run taken over: its driver stops at the next step
    ended: bool = False  # this claim's drive is over (answered, paused, failed or lost): no more lines for it
    # Nothing of the run was queued for delivery yet (a run this claim started and that has shown no
    # line, card or notice): its answer has no progress message to replace and nothing to wait behind.
    quiet: bool = False
    # Read-only steps not yet stored: their messages and audit rows land with the run's next write.
    unrecorded_messages: list[dict[str, Any]] = field(default_factory=list)
    unrecorded_rows: list[Entry] = field(default_factory=list)

    def young(self, now: datetime) -> bool:
        """Still inside `CHATOPS_PROGRESS_AFTER` since it was claimed: a quick run shows no working
        line, and its read-only steps are not stored one by one (see `RunStore.defer_step`)."""
        return self.progress_from is not None and now < self.progress_from

    def unrecorded(self) -> tuple[list[dict[str, Any]], list[Entry]]:
        """What the run's next write must store first (copies: a retried transaction sees the same)."""
        return list(self.unrecorded_messages), list(self.unrecorded_rows)

    def recorded(self) -> None:
        self.unrecorded_messages, self.unrecorded_rows = [], []


class _Taken(Exception):
    """Another replica claimed the conversation while this one admitted its messages (rolled back)."""


@dataclass(frozen=True)
class Proposal:
    """A write call to freeze into an approval."""

    call_id: str
    prepared: PreparedCall
    rule: CallRule
    preview: list[str]
    preview_ok: bool


@dataclass(frozen=True)
class Started:
    """What trying to start a run found: a claim to drive, a waiting run to try resuming, or nothing."""

    claim: RunClaim | None = None
    resume_run_id: str | None = None


@dataclass
class StepRecord:
    """What recording a step did: paused on `created` approvals, or go on with `tool_messages`."""

    owned: bool
    created: list[str] = field(default_factory=list)
    tool_messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def paused(self) -> bool:
        return bool(self.created)


def trim_history(messages: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Keep at most `limit` messages, cutting only at a user message so tool replies stay paired."""
    if len(messages) <= limit:
        return messages
    for i in range(len(messages) - limit, len(messages)):
        if messages[i].get("role") == "user":
            return messages[i:]
    return messages[-1:]


def tool_messages(assistant: dict[str, Any], results: dict[str, str]) -> list[dict[str, Any]]:
    """The tool messages answering `assistant`'s calls that have a result, in the calls' order."""
    calls = assistant.get("tool_calls") or []
    return [{"role": "tool", "tool_call_id": c["id"], "content": results[c["id"]]} for c in calls if c["id"] in results]


def safe_name(user: User) -> str:
    """OpenAI's `name` field allows only [a-zA-Z0-9_-]{1,64}."""
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "_" for ch in user.id)
    return cleaned[:64] or "user"


class RunStore:
    def __init__(self, ctx: AppContext, approvals: ApprovalService) -> None:
        self.ctx = ctx
        self.approvals = approvals
        # Conversations a start in this process is about to read the queue of (waiting for a run
        # slot, or for the database): that read takes whatever is queued by then.
        self.unread: set[str] = set()

    def _lease(self) -> datetime:
        return self.ctx.clock() + timedelta(seconds=self.ctx.settings.lease_seconds)

    # ------------------------------------------------------------------ starting
    async def start_run(self, key: str) -> Started:
        """Claim the conversation and move its queued messages into a new run. Nothing to drive when
        there is nothing queued, another run holds the conversation, or every message was refused."""
        collisions = 0
        while True:
            try:
                result = await self.ctx.db.run(lambda s: self._start_once(s, key))
            except IntegrityError:  # another replica created the conversation's row meanwhile: look again
                collisions += 1
                if collisions > 3:
                    raise
                continue
            except _Taken:
                return Started()  # another replica claimed the conversation first; it drains the queue
            if result is not None:
                return result

    async def _start_once(self, session: DbSession, key: str) -> Started | None:
        """One attempt; None means "every message was refused, look again"."""
        ctx = self.ctx
        await run_rows.lock_for_start(session, key)
        queued, conv = await run_rows.queued_and_conversation(session, key)
        self.unread.discard(key)
        if not queued:
            return Started()
        if conv is not None and conv.active_run_id is not None:
            active = await session.get(Run, conv.active_run_id)
            if active is not None and active.status == R.WAITING:
                await self._supersede(session, active, queued)
                return Started(resume_run_id=active.id)
            if active is not None and active.status == R.RUNNING:
                return Started()  # the running run takes these messages when it finishes
            # else a stale lock (its run ended): take the conversation
        run_id = run_rows.new_run_id()
        last, messages = await self._admit(session, run_id, queued, conv.messages if conv else [])
        now, requester, platform = ctx.clock(), last or queued[0].message, queued[0].message.thread.platform
        holder = run_id if last else None  # every message refused: nothing to run, nothing holds it
        if conv is None:
            await run_rows.create_conversation(session, key, platform, messages, holder, now)
        elif not await run_rows.claim_conversation(session, conv, holder, messages, now):
            raise _Taken  # rolls the admission back: the replica that took the conversation admits them
        await run_rows.insert_run(
            session, id=run_id, conversation_key=key, platform=platform, requester=requester.user.to_dict(),
            thread=self._thread_of(requester), status=R.RUNNING if last else R.DONE, step=0, owner=ctx.replica_id,
            lease_until=self._lease() if last else None, version=1, pending_results={}, created_at=now, updated_at=now,
        )  # fmt: skip
        if last is None:
            return None
        claim = RunClaim(run_id, 1, key, 0, last.thread, last.user, last.channel_id, messages, self._progress_from(), quiet=True)
        return Started(claim)

    @staticmethod
    def _thread_of(msg: IncomingMessage) -> dict[str, Any]:
        """Where what follows `msg` is answered, as a run stores it (its author is the requester)."""
        return {**msg.thread.to_dict(), "channel_id": msg.channel_id}

    async def _supersede(self, session: DbSession, active: Run, queued: list[QueuedMessage]) -> None:
        """A newer message cancels its own author's pending approvals; others' cards stay valid, and
        the message waits (held) until they are decided."""
        authors = {q.message.user.id for q in queued}
        await self.approvals.cancel_pending(
            session, sa.and_(col(Approval.run_id) == active.id, col(Approval.requester_id).in_(authors)), texts.SUPERSEDED
        )
        if await self._undecided(session, active):
            await run_rows.set_statuses(session, [(q.id, Q.HELD) for q in queued], None, self.ctx.clock())
            for q in queued:
                thread = q.message.thread.to_dict()
                await outbox.enqueue_reply(session, self.ctx, thread, texts.WAITING_FOR_OTHERS, run_id=active.id)

    async def _undecided(self, session: DbSession, run: Run) -> bool:
        rows = await session.execute(
            sa.select(col(Approval.status)).where(col(Approval.run_id) == run.id, col(Approval.step) == run.step)
        )
        return any(not ApprovalStatus(s).decided for s in rows.scalars().all())

    async def _admit(
        self, session: DbSession, run_id: str, queued: list[QueuedMessage], history: list[dict[str, Any]]
    ) -> tuple[IncomingMessage | None, list[dict[str, Any]]]:
        """Move queued messages into the run; refuse those policy or a limit forbids. Returns the last
        admitted message (its author is the requester of what follows), or None, and the history
        with the admitted messages (trimmed)."""
        ctx = self.ctx
        last: IncomingMessage | None = None
        messages, statuses, rows = list(history), [], []
        for q in queued:
            msg = q.message
            verdict = await self._may_run(session, msg)
            common = {"run_id": run_id, "platform": msg.user.platform, "actor": msg.user.key}
            if not verdict.allowed:
                statuses.append((q.id, Q.REFUSED))
                rows.append(entry("request_refused", status="refused", reason=verdict.reason, **common))
                notice = (
                    verdict.reason
                    if verdict.reason.startswith("You ")
                    else texts.NOT_ALLOWED_TO_USE.format(reason=verdict.reason)
                )
                await outbox.enqueue_reply(session, ctx, msg.thread.to_dict(), notice, run_id=None)
                continue
            last = msg
            statuses.append((q.id, Q.RUNNING))
            messages.append({"role": "user", "content": ctx.redactor.redact_text(msg.text), "name": safe_name(msg.user)})
            rows.append(entry("run_started", status="running", inbox_id=q.id, text=msg.text, **common))
        await run_rows.set_statuses(session, statuses, run_id, ctx.clock())
        await ctx.audit.record_many(session, rows)
        return last, trim_history(messages, ctx.settings.history_limit)

    async def _may_run(self, session: DbSession, msg: IncomingMessage) -> Verdict:
        policy = self.ctx.policy
        verdict = policy.may_use(msg.user, msg.channel_id)
        limit = policy.request_limit()
        if verdict.allowed and limit is not None and not await limits.admit(session, msg.user.key, limit, self.ctx.clock()):
            return Verdict(False, texts.RATE_LIMITED.format(limit=limit))
        return verdict

    # ------------------------------------------------------------------ leases
    async def queue_progress(self, claim: RunClaim, line: str) -> None:
        """Queue a working line for the run, unless it is no longer this claim's to speak for (it
        paused, ended or was taken over since the line was made; a held line released just as its
        run answered is dropped without asking the database)."""
        if claim.ended:
            return
        claim.quiet = False

        async def queue(session: DbSession) -> None:
            if not claim.ended and await run_rows.still_mine(session, claim.run_id, claim.version):
                await outbox.enqueue_progress(session, self.ctx, claim.thread.to_dict(), line, run_id=claim.run_id)

        await self.ctx.db.run(queue)

    async def renew(self, claim: RunClaim) -> bool:
        async def renew(session: DbSession) -> bool:
            return await run_rows.renew(session, claim.run_id, claim.version, self._lease())

        kept = await self.ctx.db.run(renew, deadline=self.ctx.settings.lease_seconds / 3)
        claim.lost = claim.lost or not kept
        return kept

    async def take_over_expired(self) -> list[RunClaim]:
        """Claim every running run whose lease expired (its owner stalled, lost the database or died)."""

        async def take(session: DbSession) -> list[RunClaim]:
            now = self.ctx.clock()
            rows = await session.execute(
                sa.select(Run)
                .where(col(Run.status) == R.RUNNING, sa.or_(col(Run.lease_until).is_(None), col(Run.lease_until) < now))
                .limit(50)
            )
            claims = []
            for run in rows.scalars().all():
                # Read before the UPDATE: the ORM brings the loaded row up to date with what it sets.
                version, previous_owner = run.version, run.owner
                took = await session.execute(
                    sa.update(Run)
                    .where(col(Run.id) == run.id, col(Run.version) == version, col(Run.status) == R.RUNNING)
                    .values(owner=self.ctx.replica_id, lease_until=self._lease(), version=version + 1, updated_at=now)
                )
                if not rowcount(took):
                    continue
                await self.ctx.audit.record(
                    session, "run_taken_over", run_id=run.id, status="running", previous_owner=previous_owner
                )
                claims.append(await self._claim_of(session, run, version + 1))
            return claims

        return await self.ctx.db.run(take)

    async def _claim_of(self, session: DbSession, run: Run, version: int) -> RunClaim:
        conv = await run_rows.conversation(session, run.conversation_key)
        messages = conv.messages if conv else []
        thread, requester = Thread.from_dict(run.thread), User.from_dict(run.requester)
        return RunClaim(
            run.id, version, run.conversation_key, run.step, thread, requester, run.thread.get("channel_id"), messages,
            progress_from=self._progress_from(),
        )  # fmt: skip

    def _progress_from(self) -> datetime:
        """When a working line of a run claimed now may appear: a run that answers sooner shows none."""
        return self.ctx.clock() + timedelta(seconds=self.ctx.settings.progress_after)

    async def hand_back(self) -> int:
        """On shutdown: end the leases this replica holds so another replica takes the runs at once."""

        async def release(session: DbSession) -> int:
            result = await session.execute(
                sa.update(Run)
                .where(col(Run.owner) == self.ctx.replica_id, col(Run.status) == R.RUNNING)
                .values(lease_until=self.ctx.clock())
            )
            return rowcount(result)

        return await self.ctx.db.run(release, deadline=5)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def defer_step(claim: RunClaim, step: int, assistant: dict[str, Any], results: dict[str, str], rows: list[Entry]) -> None:
        """A step of a young run that only read (nothing waits on a person, nothing changed outside):
        kept with the claim and stored by the run's next write, in the same transaction. A run that
        answers quickly thus writes its start and its finish only; should this process die first,
        whoever takes the run over repeats the reads, which change nothing, and records them then."""
        new = [assistant, *tool_messages(assistant, results)]
        claim.unrecorded_messages = [*claim.unrecorded_messages, *new]
        claim.unrecorded_rows = [*claim.unrecorded_rows, *rows]
        claim.messages = [*claim.messages, *new]
        claim.step = step

    async def record_step(
        self,
        claim: RunClaim,
        step: int,
        assistant: dict[str, Any],
        results: dict[str, str],
        proposals: list[Proposal],
        rows: list[Entry],
    ) -> StepRecord:
        """One step in one transaction: the assistant message, results of calls that ran, and either
        the approvals (pause) or the tool messages (go on). Proposals over the requester's pending limit
        are refused here, atomically with the count."""
        claim.quiet = False  # a step may queue a line, cards or a notice
        record = await self.ctx.db.run(
            lambda s: self._record_step(s, claim, step, assistant, dict(results), proposals, list(rows))
        )
        if record.owned:
            claim.recorded()
        if record.created:
            metrics.APPROVALS.labels("pending").inc(len(record.created))
        return record

    async def _record_step(
        self, session: DbSession, claim: RunClaim, step: int, assistant: dict[str, Any],
        results: dict[str, str], proposals: list[Proposal], rows: list[Entry],
    ) -> StepRecord:  # fmt: skip
        ctx, now = self.ctx, self.ctx.clock()
        if not await run_rows.advance(session, claim.run_id, claim.version, step, now, self._lease()):
            return StepRecord(owned=False)
        conv = await run_rows.conversation(session, claim.conversation_key)
        assert conv is not None
        if proposals and not await self._within_pending_limit(session, claim, len(proposals), results, proposals, rows):
            proposals = []
        answers = tool_messages(assistant, results)
        earlier, earlier_rows = claim.unrecorded()
        rows[:0] = earlier_rows
        new = ctx.redactor.redact([*earlier, assistant, *([] if proposals else answers)])
        await run_rows.save_messages(session, conv.key, [*conv.messages, *new], now)
        if proposals:  # the progress line first: the cards follow it in the thread
            line = texts.PROGRESS_WAITING.format(count=len(proposals))
            await outbox.enqueue_progress(session, ctx, claim.thread.to_dict(), line, run_id=claim.run_id)
        created = [await self._create_approval(session, claim, step, p, rows) for p in proposals]
        if created:
            await run_rows.pause(session, claim.run_id, ctx.redactor.redact(results))
        await ctx.audit.record_many(session, rows)
        return StepRecord(owned=True, created=created, tool_messages=[] if created else answers)

    async def _within_pending_limit(
        self,
        session: DbSession,
        claim: RunClaim,
        count: int,
        results: dict[str, str],
        proposals: list[Proposal],
        rows: list[Entry],
    ) -> bool:
        ctx = self.ctx
        limit = ctx.policy.pending_limit()
        if limit is None:
            return True
        requester = claim.requester
        await limits.lock_user(session, requester.key, ctx.clock())
        waiting = (
            await session.execute(
                sa.select(sa.func.count())
                .select_from(Approval)
                .where(
                    col(Approval.status) == S.PENDING,
                    col(Approval.requester_id) == requester.id,
                    col(Approval.platform) == claim.thread.platform,
                )
            )
        ).scalar_one()
        if waiting + count <= limit:
            return True
        for p in proposals:
            results[p.call_id] = texts.MODEL_DENIED.format(reason=f"{requester.label} already has {waiting} approvals waiting")
            rows.append(
                entry("approval_refused", run_id=claim.run_id, tool=p.prepared.spec.name, actor=requester.key,
                      status="too_many_pending", waiting=waiting, limit=limit)
            )  # fmt: skip
        await outbox.enqueue_reply(
            session, ctx, claim.thread.to_dict(), texts.TOO_MANY_PENDING.format(count=waiting), run_id=claim.run_id
        )
        return False

    async def _create_approval(self, session: DbSession, claim: RunClaim, step: int, p: Proposal, rows: list[Entry]) -> str:
        ctx, now = self.ctx, self.ctx.clock()
        spec, args = p.prepared.spec, p.prepared.args
        card = card_content(spec.sentence(args), args, list(p.rule.risks), p.preview, p.rule.reason, nulls=spec.nulls_are_sent)
        approval = Approval(
            id=new_approval_id(),
            run_id=claim.run_id,
            step=step,
            tool_call_id=p.call_id,
            tool_name=spec.name,
            args=args,
            args_sha256=args_digest(args),
            status=S.PENDING,
            platform=claim.thread.platform,
            requester_id=claim.requester.id,
            requester=claim.requester.to_dict(),
            thread=claim.thread.to_dict(),
            card=ctx.redactor.redact(card),
            rule=p.rule.rule,
            votes=[],
            preview_facts={"lines": p.preview} if p.preview_ok else None,
            expires_at=expiry(now, p.rule, ctx.settings.approval_ttl),
            created_at=now,
        )
        session.add(approval)
        await session.flush()
        rows.append(
            entry("approval_requested", run_id=claim.run_id, approval_id=approval.id, platform=approval.platform,
                  actor=claim.requester.key, tool=approval.tool_name, status="pending", args_sha256=approval.args_sha256,
                  rule=p.rule.rule, expires_at=approval.expires_at.isoformat())
        )  # fmt: skip
        await outbox.enqueue_card(session, ctx, approval)
        return approval.id

    # ------------------------------------------------------------------ resuming
    async def resume(self, run_id: str) -> RunClaim | None:
        """waiting -> running once every approval of the step is decided (any replica may win)."""
        return await self.ctx.db.run(lambda s: self._resume(s, run_id))

    async def _resume(self, session: DbSession, run_id: str) -> RunClaim | None:
        run = await session.get(Run, run_id)
        if run is None or run.status != R.WAITING:
            return None
        approvals = (
            (await session.execute(sa.select(Approval).where(col(Approval.run_id) == run_id, col(Approval.step) == run.step)))
            .scalars()
            .all()
        )
        if any(not ApprovalStatus(a.status).decided for a in approvals):
            return None
        if not await run_rows.resume(session, run_id, run.version, self.ctx.replica_id, self._lease(), self.ctx.clock()):
            return None
        conv = await run_rows.conversation(session, run.conversation_key)
        assert conv is not None
        messages = self._answered(run, approvals, conv)
        queued = await run_rows.queued_or_held(session, conv.key)
        last, messages = await self._admit(session, run_id, queued, messages) if queued else (None, messages)
        requester, thread = (last.user.to_dict(), self._thread_of(last)) if last else (run.requester, run.thread)
        if last is not None:
            await run_rows.set_requester(session, run_id, requester, thread)
        await run_rows.save_messages(session, conv.key, messages, self.ctx.clock())
        await self.ctx.audit.record(
            session, "run_resumed", run_id=run_id, status="running", decided={a.id: a.status for a in approvals}
        )
        claim = RunClaim(
            run_id, run.version + 1, conv.key, run.step, Thread.from_dict(thread), User.from_dict(requester),
            thread.get("channel_id"), messages, progress_from=self._progress_from(),
        )  # fmt: skip
        with i18n.speaking(requester.get("lang"), requester.get("tz")):
            claim.opening_line = str(texts.PROGRESS_CONTINUING)
        return claim

    def _answered(self, run: Run, approvals: Sequence[Approval], conv: ConversationRow) -> list[dict[str, Any]]:
        """The history with the paused step's tool messages: the results of the calls that ran, and
        what became of each approval."""
        results = dict(run.pending_results or {})
        results.update({a.tool_call_id: model_result(a) for a in approvals})
        last_calls = next((m for m in reversed(conv.messages) if m.get("role") == "assistant" and m.get("tool_calls")), None)
        lost = texts.MODEL_CANCELLED.format(reason="lost")
        answers = [
            {"role": "tool", "tool_call_id": c["id"], "content": results.get(c["id"], lost)}
            for c in (last_calls or {}).get("tool_calls", [])
        ]
        redacted: list[dict[str, Any]] = self.ctx.redactor.redact([*conv.messages, *answers])
        return redacted

    # ------------------------------------------------------------------ ending
    async def finish(self, claim: RunClaim, text: str, status: RunStatus, rows: list[Entry]) -> bool:
        """Queue the final text, close the run and release the conversation in one transaction.
        Returns True when more messages are queued in the conversation."""
        finished, more = await self.ctx.db.run(lambda s: self._finish(s, claim, text, status, list(rows)))
        claim.recorded()
        if finished:
            metrics.RUNS.labels(str(status)).inc()
        return more

    async def _finish(
        self, session: DbSession, claim: RunClaim, text: str, status: RunStatus, rows: list[Entry]
    ) -> tuple[bool, bool]:
        ctx, now = self.ctx, self.ctx.clock()
        earlier, earlier_rows = claim.unrecorded()
        rows[:0] = earlier_rows
        steps = sum(1 for row in rows if row.kind == "model_call")
        if not await run_rows.end(session, claim.run_id, claim.version, status, steps, now):
            return False, False  # taken over meanwhile; the new owner finishes it
        key = claim.conversation_key
        conv = await run_rows.conversation(session, key)
        if conv is not None:
            messages = [*conv.messages, *ctx.redactor.redact(earlier)]
            if status == R.DONE:
                messages.append({"role": "assistant", "content": ctx.redactor.redact_text(text)})
            await run_rows.release_conversation(
                session, key, claim.run_id, trim_history(messages, ctx.settings.history_limit), now
            )
        await run_rows.done(session, claim.run_id)
        await outbox.enqueue_answer(session, ctx, claim.thread.to_dict(), text, run_id=claim.run_id, first=claim.quiet)
        posted = entry("reply_posted", run_id=claim.run_id, platform=claim.thread.platform, status=status, text=text)
        await ctx.audit.record_many(session, [*rows, posted])
        # Messages held behind this run's approvals start a run of their own (it ended without resuming).
        return True, await run_rows.release_held(session, key)

    async def waiting_and_decided(self) -> list[str]:
        """Waiting runs whose step has no undecided approval left (a resume was lost)."""
        undecided = [str(s) for s in ApprovalStatus if not s.decided]

        async def find(session: DbSession) -> list[str]:
            open_approval = (
                sa.select(col(Approval.id))
                .where(
                    col(Approval.run_id) == col(Run.id), col(Approval.step) == col(Run.step), col(Approval.status).in_(undecided)
                )
                .exists()
            )
            rows = await session.execute(sa.select(col(Run.id)).where(col(Run.status) == R.WAITING, ~open_approval).limit(200))
            return list(rows.scalars().all())

        return await self.ctx.db.run(find, read=True)

    async def queue_depths(self) -> dict[str, int]:
        """How much work waits: queued messages, pending approvals, undelivered outbox jobs."""

        async def count(session: DbSession) -> dict[str, int]:
            queued = sa.select(sa.func.count()).select_from(InboxEvent).where(col(InboxEvent.status) == Q.QUEUED)
            pending = sa.select(sa.func.count()).select_from(Approval).where(col(Approval.status) == S.PENDING)
            outbox_jobs = sa.select(sa.func.count()).select_from(OutboxJob).where(col(OutboxJob.status) == OutboxStatus.PENDING)
            return {
                "inbox": (await session.execute(queued)).scalar_one(),
                "approvals": (await session.execute(pending)).scalar_one(),
                "outbox": (await session.execute(outbox_jobs)).scalar_one(),
            }

        return await self.ctx.db.run(count, read=True)

    async def idle_conversations(self, older_than: float) -> list[tuple[str, datetime]]:
        """Conversations with queued messages and no run holding them, with their oldest such message's time."""
        cutoff = self.ctx.clock() - timedelta(seconds=older_than)

        async def find(session: DbSession) -> list[tuple[str, datetime]]:
            rows = await session.execute(
                sa.select(col(InboxEvent.conversation_key), sa.func.min(col(InboxEvent.created_at)))
                .outerjoin(Conversation, col(Conversation.key) == col(InboxEvent.conversation_key))
                .where(
                    col(InboxEvent.status) == Q.QUEUED,
                    col(InboxEvent.created_at) <= cutoff,
                    col(Conversation.active_run_id).is_(None),
                )
                .group_by(col(InboxEvent.conversation_key))
            )
            return [(key, oldest) for key, oldest in rows.all()]

        return await self.ctx.db.run(find, read=True)
