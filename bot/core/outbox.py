"""The durable outbox: every card, card update and reply the core sends is a job row written in the
same transaction as the state change that calls for it, then delivered by any replica.

Delivery is tried at once after the commit, and again by the delivery loop on 429 (after the
platform's Retry-After), 5xx and network errors, until the job's deadline passes. A job queued by a
process that delivers, with nothing earlier still waiting in its thread, is stored already claimed
by that process (its lease in the same INSERT) and handed to it after the commit: no look for due
jobs and no claim of its own (two transactions fewer per message).
A card that could not be delivered by then is cancelled (nobody can approve what nobody sees) and
the model is told; a reply that could not be delivered is recorded as such. Jobs of one run are
delivered in order; a job is claimed under a short lease, so two replicas never send it together.

Progress: a run's `progress` jobs keep ONE message per run up to date (the first is posted, later ones
edit it; a newer progress or the answer supersedes a waiting one, so a burst of steps costs one edit;
they give up after `PROGRESS_DEADLINE`, nothing depends on them). The run's `answer` replaces that
message (the adapter may stream a long answer instead). `home_refresh` jobs re-publish a person's
home view (Slack App Home), at most one waiting per person.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlmodel import col

from bot.core import home_audience, metrics, texts
from bot.core.cards import card_view
from bot.core.channels import DeliveryFailed
from bot.core.context import AppContext
from bot.core.events import Thread, User
from storage.engine import DbSession, rowcount
from storage.models import Approval, ApprovalStatus, OutboxJob, OutboxKind, OutboxStatus

log = logging.getLogger("chatops.outbox")

CLAIM_SECONDS = 30.0
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
ERROR_LIMIT = 500
PROGRESS_DEADLINE = 60.0  # a progress edit older than this is not worth sending
QUIET_KINDS = frozenset({OutboxKind.PROGRESS, OutboxKind.HOME_REFRESH})  # given up without an audit row


def _thread_key(thread: dict[str, Any]) -> str:
    """What orders the jobs of no run: those of one chat thread go out in order."""
    return "thread:" + orjson.dumps(thread, option=orjson.OPT_SORT_KEYS).decode()[:290]


def _job(ctx: AppContext, kind: OutboxKind, thread: dict[str, Any], **values: Any) -> dict[str, Any]:
    now = ctx.clock()
    return {
        "kind": kind,
        "platform": thread["platform"],
        "thread_key": values.get("run_id") or _thread_key(thread),
        "thread": thread,
        "status": OutboxStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "deadline": now + timedelta(seconds=ctx.settings.outbox_deadline),
        "created_at": now,
        **values,
    }


async def _insert(session: DbSession, ctx: AppContext, job: dict[str, Any]) -> None:
    """Store `job`. When this process delivers and nothing queued earlier in its thread is still
    waiting (but jobs this transaction claimed), the job is stored already claimed by this process
    and handed to it after the commit (`Outbox.deliver_claimed`): no look for due jobs, no claim of
    its own. Otherwise it waits for the delivery rounds (`outbox_queued`)."""
    born: list[OutboxJob] = session.info.setdefault("outbox_born", [])
    if ctx.delivers_outbox and job["next_attempt_at"] <= job["created_at"]:
        waiting = await session.execute(
            sa.select(col(OutboxJob.id)).where(
                col(OutboxJob.thread_key) == job["thread_key"], col(OutboxJob.status) == OutboxStatus.PENDING
            )
        )
        if set(waiting.scalars()) <= {b.id for b in born}:
            lease = job["created_at"] + timedelta(seconds=CLAIM_SECONDS)
            job = {**job, "owner": ctx.replica_id, "lease_until": lease, "attempts": 1}
            inserted = await session.execute(sa.insert(OutboxJob).values(**job).returning(col(OutboxJob.id)))
            born.append(OutboxJob(id=inserted.scalar_one(), **job))
            return
    await session.execute(sa.insert(OutboxJob).values(**job))
    if job["next_attempt_at"] <= job["created_at"]:  # one due later is kicked then (`outbox_due_later`)
        session.info["outbox_queued"] = True


async def enqueue_reply(session: DbSession, ctx: AppContext, thread: dict[str, Any], text: str, *, run_id: str | None) -> None:
    """Queue a reply or notice in the caller's transaction (redacted before it is stored)."""
    await _insert(session, ctx, _job(ctx, OutboxKind.REPLY, thread, run_id=run_id, text=ctx.redactor.redact_text(text)))


async def enqueue_card(session: DbSession, ctx: AppContext, approval: Approval) -> None:
    """Queue the first post of an approval's card (and a refresh of the homes that list it)."""
    await _insert(session, ctx, _job(ctx, OutboxKind.CARD, approval.thread, run_id=approval.run_id, approval_id=approval.id))
    await enqueue_home_refresh(session, ctx, approval)


async def enqueue_card_update(session: DbSession, ctx: AppContext, approval: Approval, *, after: float = 0.0) -> None:
    """Queue a refresh of an approval's card (due `after` seconds from now); it renders the approval's
    state at delivery time."""
    job = _job(ctx, OutboxKind.CARD_UPDATE, approval.thread, run_id=None, approval_id=approval.id)
    job["thread_key"] = f"update:{approval.id}"
    job["next_attempt_at"] = job["next_attempt_at"] + timedelta(seconds=after)
    await _insert(session, ctx, job)
    await enqueue_home_refresh(session, ctx, approval)


async def _supersede_progress(session: DbSession, run_id: str) -> None:
    """Waiting (unclaimed) progress edits of a run are replaced by what is queued now."""
    await session.execute(
        sa.update(OutboxJob)
        .where(
            col(OutboxJob.run_id) == run_id,
            col(OutboxJob.kind) == OutboxKind.PROGRESS,
            col(OutboxJob.status) == OutboxStatus.PENDING,
            col(OutboxJob.lease_until).is_(None),
        )
        .values(status=OutboxStatus.SENT, last_error="superseded by a newer progress")
    )


async def enqueue_progress(
    session: DbSession,
    ctx: AppContext,
    thread: dict[str, Any],
    text: str,
    *,
    run_id: str,
    edit_only: bool = False,
    not_before: datetime | None = None,
) -> None:
    """Queue the run's progress line (it edits the run's one progress message in place); `edit_only`:
    a last word for a progress message that exists (a stopped run), never a new message;
    `not_before`: a working line waits until then, so a run that answers sooner (its answer
    supersedes the line) never shows one."""
    await _supersede_progress(session, run_id)
    thread = {**thread, "edit_only": True} if edit_only else thread
    job = _job(ctx, OutboxKind.PROGRESS, thread, run_id=run_id, text=ctx.redactor.redact_text(text))
    if not_before is not None and not_before > job["next_attempt_at"]:
        job["next_attempt_at"] = not_before
        session.info.setdefault("outbox_due_later", []).append(not_before)
    job["deadline"] = max(job["next_attempt_at"], job["created_at"]) + timedelta(
        seconds=min(PROGRESS_DEADLINE, ctx.settings.outbox_deadline)
    )
    await _insert(session, ctx, job)


async def enqueue_answer(session: DbSession, ctx: AppContext, thread: dict[str, Any], text: str, *, run_id: str) -> None:
    """Queue a run's final text: it replaces the run's progress message when there is one and no card
    was posted below it since (see `Outbox._progress_message`)."""
    await _supersede_progress(session, run_id)
    await _insert(session, ctx, _job(ctx, OutboxKind.ANSWER, thread, run_id=run_id, text=ctx.redactor.redact_text(text)))


async def enqueue_home_refresh(session: DbSession, ctx: AppContext, approval: Approval) -> None:
    """Queue a home refresh for each person `approval` concerns, unless one is already waiting for
    them (coalesced: the refresh renders the home when it is delivered, so it shows this change too)."""
    if approval.platform not in home_audience.HOME_PLATFORMS:
        return
    for person in home_audience.concerned(ctx, approval):
        key = f"home:{approval.platform}:{person['user']}"[:300]
        waiting = await session.execute(
            sa.select(col(OutboxJob.id))
            .where(
                col(OutboxJob.thread_key) == key,
                col(OutboxJob.status) == OutboxStatus.PENDING,
                col(OutboxJob.lease_until).is_(None),
            )
            .limit(1)
        )
        if waiting.first() is None:
            job = _job(ctx, OutboxKind.HOME_REFRESH, {"platform": approval.platform, "coords": person}, run_id=None)
            job["thread_key"] = key
            await _insert(session, ctx, job)


@dataclass(frozen=True)
class Delivered:
    """What one delivery attempt did: the approval a card belongs to when it was given up."""

    gave_up_card: Approval | None = None


class Outbox:
    """Delivers queued jobs through the channel adapters."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self.on_card_given_up: list[Any] = []  # callbacks(approval) set by the engine (resume the run)
        self._kicks = 0  # how many times delivery rounds were asked for
        self._covered: dict[int, int] = {}  # card job -> newest card update its rendering read shows

    def kick(self) -> None:
        """Deliver due jobs now, in a tracked background task (coalesced); the delivery loop is only
        for retries and for jobs other replicas left behind."""
        self._kicks += 1
        self.ctx.tasks.spawn_coalesced("outbox-deliver", self._deliver_round)

    async def _deliver_round(self) -> None:
        try:
            await self.deliver_due()
        except Exception as exc:  # noqa: BLE001 - the database may be away; the loop tries again
            log.warning("outbox delivery round failed: %s", type(exc).__name__)

    async def deliver_due(self, limit: int = 50, rounds: int = 20) -> int:
        """Claim and deliver the jobs that are due now (any replica's), in rounds: a job waits for the
        earlier jobs of its run, so each round frees the next. Returns how many were tried."""
        tried: set[int] = set()
        for _ in range(rounds):
            ids = [i for i in await self.ctx.db.run(lambda s: self._due(s, limit), read=True) if i not in tried]
            if not ids:
                break
            for job_id in ids:
                tried.add(job_id)
                try:
                    await self.deliver(job_id)
                except Exception as exc:  # noqa: BLE001 - bookkeeping failed: its lease runs out, it is tried again
                    log.warning("outbox job %s: %s; it will be tried again", job_id, type(exc).__name__)
        return len(tried)

    async def _due(self, session: DbSession, limit: int) -> list[int]:
        now = self.ctx.clock()
        earlier = sa.orm.aliased(OutboxJob)
        blocked = (
            sa.select(col(earlier.id))
            .where(
                col(earlier.thread_key) == col(OutboxJob.thread_key),
                col(earlier.status) == OutboxStatus.PENDING,
                col(earlier.id) < col(OutboxJob.id),
            )
            .exists()
        )
        rows = await session.execute(
            sa.select(col(OutboxJob.id))
            .where(
                col(OutboxJob.status) == OutboxStatus.PENDING,
                col(OutboxJob.next_attempt_at) <= now,
                sa.or_(col(OutboxJob.lease_until).is_(None), col(OutboxJob.lease_until) < now),
                ~blocked,
            )
            .order_by(col(OutboxJob.id))
            .limit(limit)
        )
        return [job_id for job_id in rows.scalars() if job_id is not None]  # a stored row's id is never None

    async def deliver(self, job_id: int) -> None:
        """Claim one job and try to deliver it once; schedules the next attempt on failure."""
        job = await self.ctx.db.run(lambda s: self._claim(s, job_id))
        if job is not None:
            await self._attempt(job)

    async def _attempt(self, job: OutboxJob) -> bool:
        """Try to deliver a job this process holds the claim of; True if it was delivered."""
        rendered_at = self.ctx.clock()
        try:
            message_id = await self._send(job)
        except Exception as exc:  # noqa: BLE001 - every failure is classified and retried or reported
            self._covered.pop(job.id or 0, None)
            await self._failed(job, exc)
            return False
        covered = self._covered.pop(job.id or 0, 0)
        await self.ctx.db.run(lambda s: self._sent(s, job, message_id, rendered_at, covered))
        return True

    def deliver_claimed(self, jobs: list[OutboxJob]) -> None:
        """After the commit that stored `jobs` already claimed by this process: deliver them in order,
        in a tracked background task."""
        self.ctx.tasks.spawn(self._deliver_claimed(jobs, self._kicks), name="outbox-claimed")

    async def _deliver_claimed(self, jobs: list[OutboxJob], kicks: int) -> None:
        stuck: set[str] = set()  # threads whose earlier job was not delivered
        for job in jobs:
            if job.thread_key in stuck:  # it waits for the one before it: handed back to the delivery rounds
                await self._release([job.id])
                continue
            try:
                delivered = await self._attempt(job)
            except Exception as exc:  # noqa: BLE001 - bookkeeping failed: its lease runs out, it is tried again
                log.warning("outbox job %s: %s; it will be tried again", job.id, type(exc).__name__)
                delivered = False
            if not delivered:
                stuck.add(job.thread_key)
        if self._kicks != kicks:  # jobs queued meanwhile may have waited for these
            self.kick()

    async def _release(self, job_ids: list[int | None]) -> None:
        release = (
            sa.update(OutboxJob)
            .where(col(OutboxJob.id).in_(job_ids), col(OutboxJob.owner) == self.ctx.replica_id)
            .values(lease_until=None, attempts=OutboxJob.attempts - 1)
        )
        try:
            await self.ctx.db.run(lambda s: s.execute(release))
        except Exception as exc:  # noqa: BLE001 - their leases run out instead
            log.warning("outbox: could not hand back %d job(s): %s", len(job_ids), type(exc).__name__)
        self.kick()

    def kick_at(self, times: list[datetime]) -> None:
        """Deliver again when the earliest of `times` comes (jobs queued to wait until then)."""
        delay = max(0.0, (min(times) - self.ctx.clock()).total_seconds())
        asyncio.get_running_loop().call_later(delay, lambda: None if self._stopped.is_set() else self.kick())

    async def _claim(self, session: DbSession, job_id: int) -> OutboxJob | None:
        now = self.ctx.clock()
        claimed = await session.execute(
            sa.update(OutboxJob)
            .where(
                col(OutboxJob.id) == job_id,
                col(OutboxJob.status) == OutboxStatus.PENDING,
                col(OutboxJob.next_attempt_at) <= now,
                sa.or_(col(OutboxJob.lease_until).is_(None), col(OutboxJob.lease_until) < now),
            )
            .values(
                owner=self.ctx.replica_id, lease_until=now + timedelta(seconds=CLAIM_SECONDS), attempts=OutboxJob.attempts + 1
            )
        )
        if not rowcount(claimed):
            return None
        return await session.get(OutboxJob, job_id)

    async def _send(self, job: OutboxJob) -> str | None:
        channel = self.ctx.channel(job.platform)
        if channel is None:
            raise DeliveryFailed(f"no {job.platform} channel is running in this process")
        thread = Thread.from_dict(job.thread)
        if job.kind == OutboxKind.REPLY:
            await channel.post_reply(thread, job.text or "")
            return None
        if job.kind in (OutboxKind.PROGRESS, OutboxKind.ANSWER, OutboxKind.HOME_REFRESH):
            return await self._send_other(channel, job, thread)
        approval = await self.ctx.db.run(lambda s: self._rendering(s, job), read=True)
        if approval is None:
            return None
        if job.kind == OutboxKind.CARD:
            return await channel.post_card(thread, card_view(approval))
        if approval.card_message_id:
            await channel.update_card(thread, approval.card_message_id, card_view(approval))
        return None

    async def _send_other(self, channel: Any, job: OutboxJob, thread: Thread) -> str | None:
        """Progress, answers and home refreshes; a channel without progress messages (the terminal)
        gets the answer as a reply and no progress at all."""
        if job.kind == OutboxKind.HOME_REFRESH:
            if hasattr(channel, "publish_home"):
                coords = thread.coords
                await channel.publish_home(User(job.platform, str(coords.get("user")), tenant=coords.get("team")))
            return None
        last_word = bool(job.thread.get("edit_only"))  # a stopped run closes its newest progress line
        progress_id = await self.ctx.db.run(lambda s: self._progress_message(s, job.run_id, newest=last_word), read=True)
        if not hasattr(channel, "post_progress"):
            if job.kind == OutboxKind.ANSWER:
                await channel.post_reply(thread, job.text or "")
            return None
        if job.kind == OutboxKind.ANSWER:
            await channel.post_answer(thread, job.text or "", progress_id)
            return None
        if progress_id is None:
            if job.thread.get("edit_only"):
                return None
            return str(await channel.post_progress(thread, job.text or "") or "") or None
        await channel.update_progress(thread, progress_id, job.text or "")
        return progress_id

    @staticmethod
    async def _progress_message(session: DbSession, run_id: str | None, *, newest: bool = False) -> str | None:
        """The id of the run's progress message to edit, if any: its newest one, unless a card of the run
        was posted below it since (then the next line or the answer is a new message below the cards: an
        edit far above notifies nobody). `newest`: that message whatever came below (a stopped run's
        last word)."""
        mine = (col(OutboxJob.run_id) == run_id, col(OutboxJob.status) == OutboxStatus.SENT)
        message_id = (
            await session.execute(
                sa.select(col(OutboxJob.message_id))
                .where(*mine, col(OutboxJob.kind) == OutboxKind.PROGRESS, col(OutboxJob.message_id).is_not(None))
                .order_by(col(OutboxJob.id).desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if message_id is None or newest:
            return message_id
        posted = (
            sa.select(sa.func.min(col(OutboxJob.id)))
            .where(*mine, col(OutboxJob.kind) == OutboxKind.PROGRESS, col(OutboxJob.message_id) == message_id)
            .scalar_subquery()
        )  # jobs of a run are delivered in order: a card sent by a later job is below the message
        below = await session.execute(
            sa.select(col(OutboxJob.id)).where(*mine, col(OutboxJob.kind) == OutboxKind.CARD, col(OutboxJob.id) > posted).limit(1)
        )
        return None if below.first() is not None else message_id

    async def _rendering(self, session: DbSession, job: OutboxJob) -> Approval | None:
        """The approval a card job renders, and (kept in `_covered`) the newest card update of it that
        was committed before this read: that rendering shows its change, so it is done too. Jobs are
        read first, the approval after: a job visible here was committed with its change before."""
        covered = await session.execute(
            sa.select(sa.func.max(col(OutboxJob.id))).where(
                col(OutboxJob.approval_id) == job.approval_id, col(OutboxJob.kind) == OutboxKind.CARD_UPDATE
            )
        )
        if job.id is not None:
            self._covered[job.id] = covered.scalar_one_or_none() or 0
        return await session.get(Approval, job.approval_id)

    async def _sent(
        self, session: DbSession, job: OutboxJob, message_id: str | None, rendered_at: datetime, covered: int
    ) -> None:
        ctx = self.ctx
        await session.execute(
            sa.update(OutboxJob)
            .where(col(OutboxJob.id) == job.id)
            .values(status=OutboxStatus.SENT, message_id=message_id, lease_until=None, last_error=None)
        )
        if job.kind not in (OutboxKind.CARD, OutboxKind.CARD_UPDATE):
            return
        # Card updates committed before this rendering read the approval show nothing newer than it
        # does: they are done too (not those due later on purpose: a refresh after a click's answer
        # must still come). Ids, not times: a job timed before the read may have committed after it.
        await session.execute(
            sa.update(OutboxJob)
            .where(
                col(OutboxJob.approval_id) == job.approval_id,
                col(OutboxJob.kind) == OutboxKind.CARD_UPDATE,
                col(OutboxJob.status) == OutboxStatus.PENDING,
                col(OutboxJob.id) <= covered,
                col(OutboxJob.next_attempt_at) <= rendered_at,
                col(OutboxJob.id) != job.id,
                sa.or_(col(OutboxJob.lease_until).is_(None), col(OutboxJob.lease_until) < rendered_at),
            )
            .values(status=OutboxStatus.SENT, last_error="superseded by a newer rendering")
        )
        approval = await session.get(Approval, job.approval_id)
        if approval is None or job.kind != OutboxKind.CARD:
            return
        if message_id:
            await session.execute(sa.update(Approval).where(col(Approval.id) == approval.id).values(card_message_id=message_id))
        await ctx.audit.record(
            session,
            "card_posted",
            run_id=approval.run_id,
            approval_id=approval.id,
            platform=approval.platform,
            tool=approval.tool_name,
            status="posted" if message_id else "not_posted",
            message_id=message_id,
            attempts=job.attempts,
        )
        if message_id and approval.status != ApprovalStatus.PENDING:
            await enqueue_card_update(session, ctx, approval)  # the decision raced ahead of the post

    async def _failed(self, job: OutboxJob, exc: Exception) -> None:
        ctx = self.ctx
        failure = exc if isinstance(exc, DeliveryFailed) else DeliveryFailed(type(exc).__name__)
        now = ctx.clock()
        delay = failure.retry_after or min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (job.attempts - 1)) * (0.5 + random.random())
        give_up = failure.permanent or now + timedelta(seconds=delay) > job.deadline
        log.warning(
            "delivering %s %s on %s failed (attempt %d): %s%s",
            job.kind, job.id, job.platform, job.attempts, failure.reason, "; giving up" if give_up else f"; retrying in {delay:.1f}s",
        )  # fmt: skip
        outcome = await ctx.db.run(lambda s: self._record_failure(s, job, failure, now, delay, give_up))
        if outcome.gave_up_card is not None:
            for callback in self.on_card_given_up:
                await callback(outcome.gave_up_card)
        if not give_up:
            metrics.OUTBOX_RETRIES.labels(job.platform).inc()
            self._wake.set()

    async def _record_failure(
        self, session: DbSession, job: OutboxJob, failure: DeliveryFailed, now: datetime, delay: float, give_up: bool
    ) -> Delivered:
        ctx = self.ctx
        values: dict[str, Any] = {"lease_until": None, "last_error": ctx.redactor.redact_text(failure.reason)[:ERROR_LIMIT]}
        if give_up:
            values["status"] = OutboxStatus.GAVE_UP
        else:
            values["next_attempt_at"] = now + timedelta(seconds=delay)
        await session.execute(sa.update(OutboxJob).where(col(OutboxJob.id) == job.id).values(**values))
        if not give_up or job.kind in QUIET_KINDS:
            return Delivered()
        await ctx.audit.record(
            session, "delivery_failed", run_id=job.run_id, approval_id=job.approval_id, platform=job.platform,
            status=job.kind, reason=failure.reason, attempts=job.attempts,
        )  # fmt: skip
        if job.kind != OutboxKind.CARD:
            return Delivered()
        from bot.core.approvals import ApprovalService  # the service queues card updates through this module

        cancelled = await ApprovalService(ctx).cancel_pending(
            session, col(Approval.id) == job.approval_id, texts.CARD_UNDELIVERED
        )
        for approval in cancelled:
            notice = texts.CARD_UNDELIVERED_NOTICE.format(tool=approval.tool_name)
            await enqueue_reply(session, ctx, approval.thread, notice, run_id=approval.run_id)
        return Delivered(cancelled[0] if cancelled else None)

    # ------------------------------------------------------------------ the delivery loop
    async def run_forever(self, poll: float) -> None:
        """Deliver due jobs whenever kicked, and at least every `poll` seconds (retries, other replicas')."""
        while not self._stopped.is_set():
            self._wake.clear()
            self.kick()  # a tracked task: whoever waits for this process's background work waits for it too
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    async def show_working(self, thread: Thread) -> None:
        """Best effort, not durable: a reaction or a status line saying the bot is on it."""
        channel = self.ctx.channel(thread.platform)
        if channel is None:
            return
        try:
            await channel.show_working(thread)
        except Exception as exc:  # noqa: BLE001 - a missing reaction loses nothing
            log.warning("show_working on %s failed: %s", thread.platform, type(exc).__name__)
