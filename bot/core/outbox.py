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

Sent marks: a delivered message is never sent again because its "sent" mark could not be written in
time, while the process that sent it lives. The mark never waits on the job row's lock (on PostgreSQL
a stopped server process, or one whose client vanished, may hold it for any time: this process's own
abandoned mark, say): with the row free it is marked sent; locked, the mark is recorded beside it in
`outbox_sent` (insert-only, no unique key: nothing to wait on), which the claim and the look for due
jobs respect (one indexed NOT EXISTS), and the sweeper folds it into the row once the row is free
(the jobs after it in its thread wait for that). Each mark transaction is bounded at `MARK_STALL`,
so one whose own server process stopped is tried again on a fresh connection well inside the claim,
and a mark is tried again until it lands while the process lives (the retry layer giving up does
not end it). What remains: the process dies, or loses the database for longer than what is left of
the claim while other replicas reach it, between the post and its mark; then the message may be
sent once more (at least once, never lost). SQLite has no row locks: the mark is a plain UPDATE.

Progress: a run's `progress` jobs keep ONE message per run up to date (the first is posted, later ones
edit it; a newer progress or the answer supersedes a waiting one, so a burst of steps costs one edit;
they give up after `PROGRESS_DEADLINE`, nothing depends on them). The run's `answer` replaces that
message (the adapter may stream a long answer instead). `home_refresh` jobs re-publish a person's
home view (Slack App Home), at most one waiting per person.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlmodel import col

from bot.core import card_copies, home_audience, metrics, texts
from bot.core.cards import card_view
from bot.core.channels import DeliveryFailed
from bot.core.context import AppContext
from bot.core.events import Thread, User
from bot.core.group_commit import GroupCommit
from storage.engine import is_transient
from storage.models import Approval, ApprovalStatus, CardCopy, OutboxJob, OutboxKind, OutboxSent, OutboxStatus, table_of
from storage.prepared import Prepared
from storage.sessions import DbSession, rowcount

log = logging.getLogger("chatops.outbox")

CLAIM_SECONDS = 30.0
# One delivery attempt ends within this, well inside its claim: an attempt still in flight when the
# claim ran out would be sent a second time by whoever claimed it next, and nobody would know.
ATTEMPT_SECONDS = CLAIM_SECONDS / 2
# A "sent" mark's transaction is bounded at this (or the database's shorter bound): one whose server
# process stopped is given up and tried again on a fresh connection well inside what is left of the claim.
MARK_STALL = CLAIM_SECONDS / 6
MARK_PAUSE_MAX = 5.0  # seconds between tries of a mark the retry layer gave up on (tried again while the process lives)
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
ERROR_LIMIT = 500
PROGRESS_DEADLINE = 60.0  # a progress edit older than this is not worth sending
QUIET_KINDS = frozenset({OutboxKind.PROGRESS, OutboxKind.HOME_REFRESH})  # given up without an audit row

# The statements of every reply, prepared once (`storage.prepared`).
_JOBS = table_of(OutboxJob)
_WAITING_IN_THREAD = Prepared(
    sa.select(_JOBS.c.id).where(_JOBS.c.thread_key == sa.bindparam("thread_key"), _JOBS.c.status == OutboxStatus.PENDING)
)
_INSERT = Prepared(sa.insert(_JOBS))
_INSERT_RETURNING_ID = Prepared(sa.insert(_JOBS).returning(_JOBS.c.id))
_SUPERSEDE_PROGRESS = Prepared(
    sa.update(_JOBS)
    .where(
        _JOBS.c.run_id == sa.bindparam("b_run_id"),
        _JOBS.c.kind == OutboxKind.PROGRESS,
        _JOBS.c.status == OutboxStatus.PENDING,
        _JOBS.c.lease_until.is_(None),
    )
    .values(status=OutboxStatus.SENT, last_error="superseded by a newer progress")
)
_NEWEST_PROGRESS = Prepared(
    sa.select(_JOBS.c.message_id)
    .where(
        _JOBS.c.run_id == sa.bindparam("b_run_id"),
        _JOBS.c.status == OutboxStatus.SENT,
        _JOBS.c.kind == OutboxKind.PROGRESS,
        _JOBS.c.message_id.is_not(None),
    )
    .order_by(_JOBS.c.id.desc())
    .limit(1)
)
_SENT = table_of(OutboxSent)
_SENT_VALUES: dict[str, Any] = {
    "status": OutboxStatus.SENT,
    "message_id": sa.bindparam("b_message_id"),
    "lease_until": None,
    "last_error": None,
}
# SQLite (no row locks: a writer holds the whole database).
_MARK_SENT = Prepared(sa.update(_JOBS).where(_JOBS.c.id == sa.bindparam("b_id")).values(**_SENT_VALUES))
# PostgreSQL: one statement that never waits on the job row's lock. Its row free, the job is marked
# sent; locked (by a server process that stopped or whose client vanished, e.g. this process's own
# abandoned mark), the mark is recorded in `outbox_sent` instead, which the claim and the look for due
# jobs respect at once, and the sweeper folds into the row once it is free (`Outbox.fold_sent`).
_UNLOCKED = sa.select(_JOBS.c.id).where(_JOBS.c.id == sa.bindparam("b_id")).with_for_update(skip_locked=True, key_share=True)
_MARKED = (
    sa.update(_JOBS).where(_JOBS.c.id.in_(_UNLOCKED.scalar_subquery())).values(**_SENT_VALUES).returning(_JOBS.c.id).cte("marked")
)
_MARK_SENT_OR_RECORD = Prepared(
    sa.insert(_SENT)
    .from_select(
        ["job_id", "message_id", "sent_at"],
        sa.select(
            sa.bindparam("b_id", type_=_SENT.c.job_id.type),
            sa.bindparam("b_message_id", type_=_SENT.c.message_id.type),
            sa.bindparam("b_now", type_=_SENT.c.sent_at.type),
        ).where(~sa.select(_MARKED.c.id).exists()),
    )
    .add_cte(_MARKED, nest_here=True)
)
# The sweeper's fold of recorded marks into their (now free) job rows, then of the records that are done.
_LOCKABLE = _JOBS.alias("lockable")
_FOLD_SENT = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id.in_(
            sa.select(_LOCKABLE.c.id)
            .where(_LOCKABLE.c.id.in_(sa.select(_SENT.c.job_id)), _LOCKABLE.c.status == OutboxStatus.PENDING)
            .with_for_update(skip_locked=True, key_share=True)
        )
    )
    .values(
        status=OutboxStatus.SENT,
        message_id=sa.select(_SENT.c.message_id)
        .where(_SENT.c.job_id == _JOBS.c.id)
        .order_by(_SENT.c.id.desc())
        .limit(1)
        .scalar_subquery(),
        lease_until=None,
        last_error=None,
    )
)
_FORGET_FOLDED = sa.delete(_SENT).where(
    ~sa.select(_JOBS.c.id).where(_JOBS.c.id == _SENT.c.job_id, _JOBS.c.status == OutboxStatus.PENDING).exists()
)

# Delivery rounds: jobs due now whose thread has nothing earlier still pending, and the claim of one.
_EARLIER = _JOBS.alias("earlier")
_CLAIMABLE = (
    _JOBS.c.status == OutboxStatus.PENDING,
    _JOBS.c.next_attempt_at <= sa.bindparam("b_now"),
    sa.or_(_JOBS.c.lease_until.is_(None), _JOBS.c.lease_until < sa.bindparam("b_now")),
    ~sa.select(_SENT.c.id).where(_SENT.c.job_id == _JOBS.c.id).exists(),  # delivered, its mark recorded beside the row
)
_DUE = Prepared(
    sa.select(_JOBS.c.id)
    .where(
        *_CLAIMABLE,
        ~sa.select(_EARLIER.c.id)
        .where(_EARLIER.c.thread_key == _JOBS.c.thread_key, _EARLIER.c.status == OutboxStatus.PENDING, _EARLIER.c.id < _JOBS.c.id)
        .exists(),
    )
    .order_by(_JOBS.c.id)
    .limit(sa.bindparam("b_limit"))
)
_CLAIM = Prepared(
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("b_id"), *_CLAIMABLE)
    .values(owner=sa.bindparam("b_owner"), lease_until=sa.bindparam("b_lease_until"), attempts=_JOBS.c.attempts + 1)
    .returning(*_JOBS.c)
)


def _thread_key(thread: dict[str, Any]) -> str:
    """What orders the jobs of no run: those of one chat thread go out in order."""
    return "thread:" + orjson.dumps(thread, option=orjson.OPT_SORT_KEYS).decode()[:290]


@dataclass(frozen=True, slots=True)
class Job:
    """A job as its delivery sees it: what a claim returned, or what a transaction stored already
    claimed (a plain record: building an ORM instance per delivered message cost ~0.3 ms a turn)."""

    id: int
    kind: str
    platform: str
    thread_key: str
    thread: dict[str, Any]
    approval_id: str | None
    run_id: str | None
    text: str | None
    attempts: int
    deadline: datetime

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Job:
        given: dict[str, Any] = {name: values.get(name) for name in _JOB_FIELDS}  # an unset column is None
        return cls(**given)


_JOB_FIELDS = tuple(f.name for f in fields(Job))


@dataclass
class BornJobs:
    """The jobs a transaction stored already claimed by this process, delivered after its commit; for
    an answer among them, the progress message it replaces, looked up in that transaction."""

    jobs: list[Job] = field(default_factory=list)
    replaces: dict[int, str | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.jobs)


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


async def _insert(session: DbSession, ctx: AppContext, job: dict[str, Any], *, first: bool = False) -> int | None:
    """Store `job`. When this process delivers and nothing queued earlier in its thread is still
    waiting (but jobs this transaction claimed), the job is stored already claimed by this process
    and handed to it after the commit (`Outbox.deliver_claimed`): no look for due jobs, no claim of
    its own (returns its id then). Otherwise it waits for the delivery rounds (`outbox_queued`).
    `first`: the caller knows nothing was ever queued in the job's thread (no look)."""
    born: BornJobs = session.info.setdefault("outbox_born", BornJobs())
    if ctx.delivers_outbox and job["next_attempt_at"] <= job["created_at"]:
        waiting: set[int] = set()
        if not first:
            waiting = set((await _WAITING_IN_THREAD.run(session, {"thread_key": job["thread_key"]})).scalars())
        if waiting <= {b.id for b in born.jobs}:
            lease = job["created_at"] + timedelta(seconds=CLAIM_SECONDS)
            job = {**job, "owner": ctx.replica_id, "lease_until": lease, "attempts": 1}
            inserted = await _INSERT_RETURNING_ID.run(session, job)
            born.jobs.append(Job.of({**job, "id": inserted.scalar_one()}))
            return born.jobs[-1].id
    await _INSERT.run(session, job)
    if job["next_attempt_at"] <= job["created_at"]:  # one due later waits for the delivery loop's rounds
        session.info["outbox_queued"] = True
    return None


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
    await _SUPERSEDE_PROGRESS.run(session, {"b_run_id": run_id})


async def enqueue_progress(
    session: DbSession,
    ctx: AppContext,
    thread: dict[str, Any],
    text: str,
    *,
    run_id: str,
    edit_only: bool = False,
) -> None:
    """Queue the run's progress line (it edits the run's one progress message in place); `edit_only`:
    a last word for a progress message that exists (a stopped run), never a new message. (A line
    that should wait until a run has worked a while is held by the runner, `progress_lines`.)"""
    await _supersede_progress(session, run_id)
    thread = {**thread, "edit_only": True} if edit_only else thread
    job = _job(ctx, OutboxKind.PROGRESS, thread, run_id=run_id, text=ctx.redactor.redact_text(text))
    job["deadline"] = job["created_at"] + timedelta(seconds=min(PROGRESS_DEADLINE, ctx.settings.outbox_deadline))
    await _insert(session, ctx, job)


async def enqueue_answer(
    session: DbSession, ctx: AppContext, thread: dict[str, Any], text: str, *, run_id: str, first: bool = False
) -> None:
    """Queue a run's final text: it replaces the run's progress message when there is one and no card
    was posted below it since (see `progress_message`). `first`: nothing of the run was ever queued
    (no progress message to replace or supersede, nothing to wait behind: three statements fewer)."""
    if not first:
        await _supersede_progress(session, run_id)
    job = _job(ctx, OutboxKind.ANSWER, thread, run_id=run_id, text=ctx.redactor.redact_text(text))
    born_id = await _insert(session, ctx, job, first=first)
    if born_id is not None:  # nothing of the run waits before it: the message it replaces is known now
        session.info["outbox_born"].replaces[born_id] = None if first else await progress_message(session, run_id)


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


async def progress_message(session: DbSession, run_id: str | None, *, newest: bool = False) -> str | None:
    """The id of the run's progress message to edit, if any: its newest one, unless a card of the run
    was posted below it since (then the next line or the answer is a new message below the cards: an
    edit far above notifies nobody). `newest`: that message whatever came below (a stopped run's
    last word)."""
    message_id = (await _NEWEST_PROGRESS.run(session, {"b_run_id": run_id})).scalar_one_or_none()
    if message_id is None or newest:
        return message_id
    mine = (col(OutboxJob.run_id) == run_id, col(OutboxJob.status) == OutboxStatus.SENT)
    posted = (
        sa.select(sa.func.min(col(OutboxJob.id)))
        .where(*mine, col(OutboxJob.kind) == OutboxKind.PROGRESS, col(OutboxJob.message_id) == message_id)
        .scalar_subquery()
    )  # jobs of a run are delivered in order: a card sent by a later job is below the message
    below = await session.execute(
        sa.select(col(OutboxJob.id)).where(*mine, col(OutboxJob.kind) == OutboxKind.CARD, col(OutboxJob.id) > posted).limit(1)
    )
    return None if below.first() is not None else message_id


@dataclass(frozen=True)
class Sent:
    """What sending a job did: the message it posted (if any), and for a card rendering the newest
    card update of its approval committed before the rendering read it (that update is shown too)."""

    message_id: str | None = None
    covers_updates_to: int = 0


@dataclass(frozen=True)
class Delivered:
    """What one delivery attempt did: the approval a card belongs to when it was given up."""

    gave_up_card: Approval | None = None


class PendingCanceller(Protocol):
    """What the outbox needs of the approval service: a card nobody could see is cancelled."""

    async def cancel_pending(self, session: DbSession, where: sa.ColumnElement[bool], reason: str) -> list[Approval]: ...


class Outbox:
    """Delivers queued jobs through the channel adapters."""

    def __init__(self, ctx: AppContext, approvals: PendingCanceller) -> None:
        self.ctx = ctx
        self.approvals = approvals
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self.on_card_given_up: list[Any] = []  # callbacks(approval) set by the engine (resume the run)
        self._kicks = 0  # how many times delivery rounds were asked for
        # Jobs delivered together are marked sent together (a card's bookkeeping has its own transaction).
        self._marks: GroupCommit[dict[str, Any], None] = GroupCommit(ctx.tasks, "outbox-sent", self._mark_sent)
        self._marking: set[int] = set()  # delivered here, marks not written yet: never claimed again here

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
            due = await self.ctx.db.run(lambda s: self._due(s, limit), read=True)
            ids = [i for i in due if i not in tried and i not in self._marking]
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
        return (await _DUE.run(session, {"b_now": self.ctx.clock(), "b_limit": limit})).scalars()

    async def deliver(self, job_id: int) -> None:
        """Claim one job and try to deliver it once; schedules the next attempt on failure."""
        job = await self.ctx.db.run(lambda s: self._claim(s, job_id))
        if job is not None:
            await self._attempt(job)

    async def _attempt(self, job: Job, replaces: dict[int, str | None] | None = None) -> bool:
        """Try to deliver a job this process holds the claim of; True if it was delivered. `replaces`:
        the progress message an answer replaces, when its transaction looked it up."""
        rendered_at = self.ctx.clock()
        try:
            async with asyncio.timeout(ATTEMPT_SECONDS):
                sent = await self._send(job, replaces or {})
        except TimeoutError:
            await self._failed(job, DeliveryFailed(f"no answer within {ATTEMPT_SECONDS:g}s (it may have been posted)"))
            return False
        except Exception as exc:  # noqa: BLE001 - every failure is classified and retried or reported
            await self._failed(job, exc)
            return False
        self._marking.add(job.id)
        try:
            if job.kind in (OutboxKind.CARD, OutboxKind.CARD_UPDATE):
                await self._card_delivered(job, sent, rendered_at)
            else:
                await self._marks.submit(self._mark(job.id, sent.message_id))
        finally:
            self._marking.discard(job.id)
        return True

    def _mark(self, job_id: int, message_id: str | None) -> dict[str, Any]:
        return {"b_id": job_id, "b_message_id": message_id, "b_now": self.ctx.clock()}

    @staticmethod
    def _marks_statement(session: DbSession) -> Prepared:
        """Marking sent never waits on a job row's lock (PostgreSQL); SQLite has no row locks."""
        return _MARK_SENT if session.bind.dialect.name == "sqlite" else _MARK_SENT_OR_RECORD

    async def _mark_sent(self, marks: list[dict[str, Any]]) -> list[None]:
        await self._until_landed(lambda s: self._marks_statement(s).run_many(s, marks), f"{len(marks)} sent mark(s)")
        return [None] * len(marks)

    async def _until_landed(self, step: Callable[[DbSession], Awaitable[Any]], what: str) -> None:
        """Run the bookkeeping of a delivered message until it lands, while this process lives: given
        up, the job's claim would run out and the message be sent a second time. Each transaction is
        bounded at `MARK_STALL` (a stopped server process is left for a fresh connection in time)."""
        stall, pause = min(self.ctx.db.stall, MARK_STALL), BACKOFF_FIRST
        while True:
            try:
                await self.ctx.db.run(step, stall=stall)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("outbox: %s not written yet (%s); trying again", what, type(exc).__name__)
            await asyncio.sleep(pause)
            pause = min(MARK_PAUSE_MAX, pause * 2)

    async def _card_delivered(self, job: Job, sent: Sent, rendered_at: datetime) -> None:
        """A card's bookkeeping (its mark, the approval's message id, the audit row) in one transaction;
        if that does not land at once (another row's lock, a stalled server), the mark alone is written
        first and the rest tried again in the background until it lands."""
        step = functools.partial(self._card_sent, job=job, sent=sent, rendered_at=rendered_at)
        stall = min(self.ctx.db.stall, MARK_STALL)
        try:
            await self.ctx.db.run(step, stall=stall, deadline=stall)
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("outbox: the bookkeeping of card job %s did not land (%s); marked sent first", job.id, type(exc).__name__)
        await self._marks.submit(self._mark(job.id, sent.message_id))
        self.ctx.tasks.spawn(self._until_landed(step, f"the bookkeeping of card job {job.id}"), name="outbox-card-sent")

    async def fold_sent(self) -> int:
        """Fold the marks recorded beside locked job rows into those rows once they are free (the
        sweeper's); returns how many rows were folded."""

        async def fold(session: DbSession) -> int:
            folded = rowcount(await session.execute(_FOLD_SENT))
            await session.execute(_FORGET_FOLDED)
            return folded

        return await self.ctx.db.run(fold)

    def deliver_claimed(self, born: BornJobs) -> None:
        """After the commit that stored `born` jobs already claimed by this process: deliver them in
        order, in a tracked background task."""
        self.ctx.tasks.spawn(self._deliver_claimed(born, self._kicks), name="outbox-claimed")

    async def _deliver_claimed(self, born: BornJobs, kicks: int) -> None:
        stuck: set[str] = set()  # threads whose earlier job was not delivered
        for job in born.jobs:
            if job.thread_key in stuck:  # it waits for the one before it: handed back to the delivery rounds
                await self._release([job.id])
                continue
            try:
                delivered = await self._attempt(job, born.replaces)
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

    async def _claim(self, session: DbSession, job_id: int) -> Job | None:
        now = self.ctx.clock()
        lease = now + timedelta(seconds=CLAIM_SECONDS)
        claimed = await _CLAIM.run(
            session, {"b_id": job_id, "b_now": now, "b_owner": self.ctx.replica_id, "b_lease_until": lease}
        )
        row = claimed.first()
        return None if row is None else Job.of(row._asdict())

    async def _send(self, job: Job, replaces: dict[int, str | None]) -> Sent:
        channel = self.ctx.channel(job.platform)
        if channel is None:
            raise DeliveryFailed(f"no {job.platform} channel is running in this process")
        thread = Thread.from_dict(job.thread)
        if job.kind == OutboxKind.REPLY:
            await channel.post_reply(thread, job.text or "")
            return Sent()
        if job.kind in (OutboxKind.PROGRESS, OutboxKind.ANSWER, OutboxKind.HOME_REFRESH):
            return Sent(await self._send_other(channel, job, thread, replaces))
        approval, covered, copies = await self.ctx.db.run(lambda s: self._rendering(s, job), read=True)
        if approval is None:
            return Sent(covers_updates_to=covered)
        if job.kind == OutboxKind.CARD:
            return Sent(await channel.post_card(thread, card_view(approval)), covered)
        if approval.card_message_id:
            await channel.update_card(thread, approval.card_message_id, card_view(approval))
        await self._update_copies(approval, copies)
        return Sent(covers_updates_to=covered)

    async def _update_copies(self, approval: Approval, copies: list[CardCopy]) -> None:
        """Patch the copies of the card (`card_copies`); one that cannot be patched (deleted, its channel
        not running here) keeps its last rendering: it never holds back the card itself."""
        for copy in copies:
            channel = self.ctx.channel(copy.platform)
            try:
                if channel is None:
                    raise DeliveryFailed(f"no {copy.platform} channel is running in this process")
                await channel.update_card(Thread.from_dict(copy.thread), copy.message_id, card_view(approval))
            except Exception as exc:  # noqa: BLE001 - a copy is a courtesy; the card was updated
                log.warning("a copy of the card of %s could not be updated: %s", approval.id, type(exc).__name__)

    async def _send_other(self, channel: Any, job: Job, thread: Thread, replaces: dict[int, str | None]) -> str | None:
        """Progress, answers and home refreshes; a channel without progress messages (the terminal)
        gets the answer as a reply and no progress at all."""
        if job.kind == OutboxKind.HOME_REFRESH:
            if hasattr(channel, "publish_home"):
                coords = thread.coords
                await channel.publish_home(User(job.platform, str(coords.get("user")), tenant=coords.get("team")))
            return None
        if not hasattr(channel, "post_progress"):
            if job.kind == OutboxKind.ANSWER:
                await channel.post_reply(thread, job.text or "")
            return None
        last_word = bool(job.thread.get("edit_only"))  # a stopped run closes its newest progress line
        if job.id is not None and job.id in replaces:
            progress_id = replaces[job.id]
        else:
            progress_id = await self.ctx.db.run(lambda s: progress_message(s, job.run_id, newest=last_word), read=True)
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
    async def _rendering(session: DbSession, job: Job) -> tuple[Approval | None, int, list[CardCopy]]:
        """The approval a card job renders, and the newest card update of it that was committed before
        this read: that rendering shows its change, so it is done too. Jobs are read first, the
        approval after: a job visible here was committed with its change before."""
        covered = await session.execute(
            sa.select(sa.func.max(col(OutboxJob.id))).where(
                col(OutboxJob.approval_id) == job.approval_id, col(OutboxJob.kind) == OutboxKind.CARD_UPDATE
            )
        )
        approval = await session.get(Approval, job.approval_id)
        copies = await card_copies.of(session, job.approval_id) if job.kind == OutboxKind.CARD_UPDATE and job.approval_id else []
        return approval, covered.scalar_one_or_none() or 0, copies

    async def _card_sent(self, session: DbSession, *, job: Job, sent: Sent, rendered_at: datetime) -> None:
        ctx, message_id = self.ctx, sent.message_id
        await self._marks_statement(session).run(session, self._mark(job.id, message_id))
        # Card updates committed before this rendering read the approval show nothing newer than it
        # does: they are done too (not those due later on purpose: a refresh after a click's answer
        # must still come). Ids, not times: a job timed before the read may have committed after it.
        await session.execute(
            sa.update(OutboxJob)
            .where(
                col(OutboxJob.approval_id) == job.approval_id,
                col(OutboxJob.kind) == OutboxKind.CARD_UPDATE,
                col(OutboxJob.status) == OutboxStatus.PENDING,
                col(OutboxJob.id) <= sent.covers_updates_to,
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

    async def _failed(self, job: Job, exc: Exception) -> None:
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
        self, session: DbSession, job: Job, failure: DeliveryFailed, now: datetime, delay: float, give_up: bool
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
        cancelled = await self.approvals.cancel_pending(session, col(Approval.id) == job.approval_id, texts.CARD_UNDELIVERED)
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
