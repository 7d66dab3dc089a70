"""The sweeper: periodic recovery on every replica, so that nothing waits forever.

Each pass: heartbeat this replica; chain staged audit rows; expire overdue approvals; remind once
about approvals near their expiry (`ApprovalService.remind_near_expiry`); mark as
`in_doubt` (reported, never re-run) executions whose lease ran out; execute approvals a decider
left `approved`; take over runs whose lease ran out, whether or not their owner is alive; resume
waiting runs whose approvals are all decided; start conversations with queued messages nobody
holds; fold "sent" marks recorded beside locked outbox rows into their rows, and hand outbox jobs
that are due to the outbox's tracked delivery task. Each part is
independent: one failing is logged and the others still run. After the periodic passes (not the one
at start-up, which the port waits for), about once an hour, forget what is older than
`CHATOPS_RETENTION_DAYS` (`retention`).

In a worker process (`chatops serve --workers N`) the sweeper is also how work starts: the front
only records and signals, `wake()` then runs `pick_up`, the prompt part of a pass (approvals left
`approved`, decided waiting runs, queued conversations nobody holds, due outbox jobs) with no
grace, since no front ever starts that work itself. The claims are the usual conditional ones, so
any number of workers, on any number of machines, can pick up the same item: one wins. So that the
workers of one machine do not all try every queued conversation, each starts at once only its
`Share` of them; another's it starts only once it has waited `SHARE_GRACE` while this worker has
no run at all (that worker is stopped, gone or far behind: a busy worker steals nothing, or under load
every worker would try every conversation again), and the periodic pass starts every conversation
left queued past `QUEUED_GRACE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col

from bot.core import metrics
from bot.core.engine import Core
from bot.core.retention import Retention
from bot.core.run_store import RunClaim
from storage.models import Approval, Replica
from storage.sessions import DbSession

log = logging.getLogger("chatops.sweeper")
APPROVED_GRACE = 2.0  # seconds a decider has to start what it approved before any replica does
QUEUED_GRACE = 2.0
SHARE_GRACE = timedelta(seconds=0.5)  # how long a queued conversation is left to the worker whose share it is


@dataclass(frozen=True)
class Share:
    """The queued conversations worker `index` of `count` on this machine starts as soon as it is woken."""

    index: int = 0
    count: int = 1

    def holds(self, key: str) -> bool:
        return self.count <= 1 or zlib.crc32(key.encode()) % self.count == self.index


EVERY_CONVERSATION = Share()  # a process that is the only one to run conversations here


class Sweeper:
    def __init__(self, core: Core, share: Share = EVERY_CONVERSATION) -> None:
        self.core = core
        self.ctx = core.ctx
        self.share = share
        self._stop = asyncio.Event()
        self._woken = asyncio.Event()
        self.retention = Retention(core.ctx)

    async def heartbeat(self) -> None:
        ctx = self.ctx
        now = ctx.clock()

        async def beat(session: DbSession) -> None:
            row = await session.get(Replica, ctx.replica_id)
            if row is None:
                session.add(
                    Replica(id=ctx.replica_id, host=socket.gethostname(), pid=os.getpid(), started_at=now, heartbeat_at=now)
                )
            else:
                row.heartbeat_at = now

        await ctx.db.run(beat)

    async def leave(self) -> None:
        """Graceful shutdown: forget this replica."""
        await self.ctx.db.run(lambda s: s.execute(sa.delete(Replica).where(col(Replica.id) == self.ctx.replica_id)), deadline=5)

    async def sweep(self) -> None:
        """One recovery pass (also run once at start-up)."""
        for part in (
            self.heartbeat,
            lambda: self.ctx.audit.chain(self.ctx.db),
            self._expire,
            self.core.approvals.remind_near_expiry,
            self._in_doubt,
            self._approved,
            self._take_over,
            self._resume_waiting,
            self._start_idle,
            self._deliver,
            self._measure_queues,
        ):
            await self._guarded(part)

    @staticmethod
    async def _guarded(part: Callable[[], Awaitable[object]]) -> None:
        try:
            await part()
        except Exception as exc:  # noqa: BLE001 - one failing part must not stop the others
            log.warning("sweep step %s failed: %s", getattr(part, "__name__", "?"), type(exc).__name__)

    async def pick_up(self) -> None:
        """Start the work that waits now, each item in a tracked task of its own (a worker's wake-up)."""
        for part in (self._approved_now, self._resume_waiting, self._start_idle_now):
            await self._guarded(part)
        self.core.out.kick()

    async def _approved_now(self) -> None:
        for approval_id in await self.core.approvals.approved_but_not_started(0):
            self.ctx.tasks.spawn_coalesced(f"execute-{approval_id}", functools.partial(self._execute, approval_id))

    async def _execute(self, approval_id: str) -> None:
        if await self.core.executor.execute(approval_id):
            approval = await self.ctx.db.run(functools.partial(self._approval, approval_id=approval_id), read=True)
            if approval is not None:
                await self.core.runner.resume(approval.run_id)

    async def _start_idle_now(self) -> None:
        ctx = self.ctx
        others_after = ctx.clock() - SHARE_GRACE
        for key, oldest in await self.core.store.idle_conversations(0):
            if self.share.holds(key) or (oldest <= others_after and ctx.run_slots.idle):
                self._start_here(key)

    def _start_here(self, key: str) -> None:
        """Start the conversation in this process, unless a start of it here has yet to read its
        queue (that start takes what is queued now: a second one would find nothing)."""
        unread = self.core.store.unread
        if key in unread:
            return
        unread.add(key)  # from now on, not once its task first runs: wake-ups come in between
        self.ctx.tasks.spawn_coalesced(f"conversation-{key}", functools.partial(self._start, key))

    async def _start(self, key: str) -> None:
        await self.core.runner.process_conversation(key)

    async def _expire(self) -> None:
        for approval in await self.core.approvals.expire_overdue():
            self.core.resume_later(approval.run_id)

    async def _in_doubt(self) -> None:
        for approval in await self.core.approvals.in_doubt_after_lease():
            log.warning(
                "approval %s (%s) outlived its execution lease: marked in_doubt, not re-run", approval.id, approval.tool_name
            )
            self.core.resume_later(approval.run_id)

    async def _approved(self) -> None:
        core = self.core
        for approval_id in await core.approvals.approved_but_not_started(APPROVED_GRACE):
            if await core.executor.execute(approval_id):
                approval = await self.ctx.db.run(functools.partial(self._approval, approval_id=approval_id), read=True)
                if approval is not None:
                    core.resume_later(approval.run_id)

    @staticmethod
    async def _approval(session: DbSession, approval_id: str) -> Approval | None:
        return await session.get(Approval, approval_id)

    async def _take_over(self) -> None:
        for claim in await self.core.store.take_over_expired():
            log.warning("run %s outlived its lease: taken over by this replica", claim.run_id)
            metrics.LEASE_TAKEOVERS.labels("run").inc()
            self.ctx.tasks.spawn(self._drive_then_continue(claim), name=f"takeover-{claim.run_id}")

    async def _drive_then_continue(self, claim: RunClaim) -> None:
        runner = self.core.runner
        if await runner.drive(claim):
            await runner.process_conversation(claim.conversation_key)

    async def _resume_waiting(self) -> None:
        for run_id in await self.core.store.waiting_and_decided():
            self.core.resume_later(run_id)

    async def _start_idle(self) -> None:
        """Conversations left queued past `QUEUED_GRACE`, whoever's share they are: a front signals
        the workers, any other process starts them itself."""
        for key, _ in await self.core.store.idle_conversations(QUEUED_GRACE):
            if self.core.wake is not None:
                self.core.start_conversation(key)
            else:
                self._start_here(key)

    async def _deliver(self) -> None:
        """Due outbox jobs (retries, other replicas' leftovers) go to the outbox's one tracked delivery
        task, so whoever waits for this process's background work (a clean stop, a test) waits for
        them too, instead of delivering here in the sweeper's own loop. First, "sent" marks recorded
        beside locked job rows are folded into the rows that are free again (the jobs after them in
        their threads wait for that)."""
        await self.core.out.fold_sent()
        self.core.out.kick()

    async def _forget(self) -> None:
        if self.retention.due():
            await self.retention.forget()

    async def _measure_queues(self) -> None:
        """The work waiting right now, for the `chatops_queue_depth` gauge, and this process's run slots."""
        slots = self.ctx.run_slots
        for state, count in (("limit", slots.limit), ("busy", slots.busy), ("waiting", slots.waiting)):
            metrics.RUN_SLOTS.labels(state).set(count)
        for kind, count in (await self.core.store.queue_depths()).items():
            metrics.QUEUE_DEPTH.labels(kind).set(count)

    async def run_forever(self) -> None:
        """A full pass every `sweep_interval` seconds after the one `App.start` ran (not a second one
        at once: it would come at no chosen time); a `pick_up` pass on every wake-up in between
        (wake-ups that come while a pass runs are served by one more pass)."""
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            deadline = loop.time() + self.ctx.settings.sweep_interval
            while not self._stop.is_set() and (left := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), left)
                if self._woken.is_set() and not self._stop.is_set():
                    self._woken.clear()
                    await self.pick_up()
            if not self._stop.is_set():
                await self.sweep()
                await self._guarded(self._forget)  # not in the start-up pass: it delays nothing

    def wake(self) -> None:
        """Work may be waiting (a worker's signal): pick it up now. Safe to call from the event loop only."""
        self._woken.set()

    def stop(self) -> None:
        self._stop.set()
        self._woken.set()
