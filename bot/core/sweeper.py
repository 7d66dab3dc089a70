"""The sweeper: periodic recovery that makes every replica's work finish even if it died.

Each pass: heartbeat this replica; expire overdue approvals; mark `executing` rows whose
executor is gone as `in_doubt` (never re-run) and report them; execute approvals a dead
decider left `approved`; take over runs whose owner is gone; resume waiting runs whose
approvals are all decided; start conversations with queued messages nobody is processing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import timedelta

import sqlalchemy as sa

from bot.core import texts
from bot.core.approvals import transition
from bot.core.engine import Core
from bot.core.events import Thread
from storage.models import Approval, Conversation, InboxEvent, Replica, Run

log = logging.getLogger("chatops.sweeper")


class Sweeper:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.ctx = core.ctx
        self._stop = asyncio.Event()

    @property
    def _dead_after(self) -> timedelta:
        return timedelta(seconds=max(3 * self.ctx.settings.sweep_interval, 15))

    async def heartbeat(self) -> None:
        ctx = self.ctx
        now = ctx.clock()
        async with ctx.db.transaction() as session:
            row = await session.get(Replica, ctx.replica_id)
            if row is None:
                host, pid = socket.gethostname(), os.getpid()
                session.add(Replica(id=ctx.replica_id, host=host, pid=pid, started_at=now, heartbeat_at=now))
            else:
                row.heartbeat_at = now

    async def leave(self) -> None:
        """Graceful shutdown: forget this replica so its leftovers are recovered at once."""
        async with self.ctx.db.transaction() as session:
            await session.execute(sa.delete(Replica).where(Replica.id == self.ctx.replica_id))

    async def _alive(self) -> set[str]:
        ctx = self.ctx
        cutoff = ctx.clock() - self._dead_after
        host = socket.gethostname()
        async with ctx.db.transaction() as session:
            rows = (await session.execute(sa.select(Replica))).scalars().all()
        alive = set()
        for r in rows:
            if r.id == ctx.replica_id or (r.heartbeat_at >= cutoff and not (r.host == host and not _pid_running(r.pid))):
                alive.add(r.id)
        return alive

    async def sweep(self) -> None:
        """One recovery pass (also run once at start-up)."""
        ctx, core = self.ctx, self.core
        await self.heartbeat()
        await ctx.audit.chain(ctx.db)  # rows staged by a process that stopped before chaining them
        alive = await self._alive()
        now = ctx.clock()
        async with ctx.db.transaction() as session:
            overdue = (
                (await session.execute(sa.select(Approval.id).where(Approval.status == "pending", Approval.expires_at <= now)))
                .scalars()
                .all()
            )
            orphaned_exec = (await session.execute(sa.select(Approval).where(Approval.status == "executing"))).scalars().all()
            approved = (
                (
                    await session.execute(
                        sa.select(Approval.id).where(
                            Approval.status == "approved", Approval.decided_at <= now - timedelta(seconds=2)
                        )
                    )
                )
                .scalars()
                .all()
            )
            runs = (await session.execute(sa.select(Run).where(Run.status.in_(("running", "waiting"))))).scalars().all()
            queued_convs = (
                (
                    await session.execute(
                        sa.select(InboxEvent.conversation_key)
                        .where(InboxEvent.status == "queued", InboxEvent.created_at <= now - timedelta(seconds=2))
                        .distinct()
                    )
                )
                .scalars()
                .all()
            )
        for approval_id in overdue:
            async with ctx.db.transaction() as session:
                a = await session.get(Approval, approval_id)
                if a and await transition(session, approval_id, "pending", expect_version=a.version, status="expired"):
                    await ctx.audit.record(
                        session, "approval_expired", run_id=a.run_id, approval_id=a.id, tool=a.tool_name, status="expired"
                    )
                else:
                    continue
            await core.runner.out.refresh_card(approval_id)
            await core.runner.resume_if_ready(a.run_id)
        for a in orphaned_exec:
            if a.executor in alive:
                continue
            detail = "the process running it stopped before it finished"
            async with ctx.db.transaction() as session:
                if not await transition(session, a.id, "executing", status="in_doubt", outcome=detail, finished_at=now):
                    continue
                await ctx.audit.record(
                    session,
                    "execution_in_doubt",
                    run_id=a.run_id,
                    approval_id=a.id,
                    tool=a.tool_name,
                    status="in_doubt",
                    executor=a.executor,
                )
            log.warning("approval %s (%s) was left executing by %s: marked in_doubt, not re-run", a.id, a.tool_name, a.executor)
            await core.runner.out.refresh_card(a.id)
            await core.runner.out.notify(
                Thread.from_dict(a.thread), texts.IN_DOUBT_REPORT.format(tool=a.tool_name, approval_id=a.id)
            )
            await core.runner.resume_if_ready(a.run_id)
        for approval_id in approved:
            if await core.executor.execute(approval_id):
                await core.runner.out.refresh_card(approval_id)
        for run in runs:
            if run.status == "waiting":
                await core.runner.resume_if_ready(run.id)
            elif run.owner not in alive:
                async with ctx.db.transaction() as session:
                    took = await session.execute(
                        sa.update(Run)
                        .where(Run.id == run.id, Run.status == "running", Run.owner == run.owner)
                        .values(owner=ctx.replica_id, updated_at=now)
                    )
                    if took.rowcount != 1:  # type: ignore[attr-defined]
                        continue
                    await ctx.audit.record(session, "run_taken_over", run_id=run.id, status="running", previous_owner=run.owner)
                ctx.tasks.spawn(core.runner.advance(run.id), name=f"takeover-{run.id}")
        for key in queued_convs:
            async with ctx.db.transaction() as session:
                conv = await session.get(Conversation, key)
            if conv is None or conv.active_run_id is None:
                ctx.tasks.spawn(core.runner.process_conversation(key), name=f"conversation-{key}")

    async def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("sweep failed; retrying next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.ctx.settings.sweep_interval)

    def stop(self) -> None:
        self._stop.set()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
