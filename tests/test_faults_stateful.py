"""A stateful property test over what platforms, users and operators do to a conversation: deliver,
redeliver, approve, reject, double-click (on two replicas at once), add a second replica, another
process holding the SQLite lock during a click, a lock held past the run leases (lease expiry and
take-over), and restart (stop a replica, start a new one on the same database).

Hypothesis draws a sequence of these per example; all examples share one SQLite database and one
event loop (fast). After each example everything is settled (sweeps run, leftover approvals
rejected) and the invariants checked: no approval runs more than once, an approval recorded as
`succeeded` ran exactly once, every run of the conversation ended within 60 s (liveness; a
conversation that did not is reported with every row it left). At the end the audit chain
verifies (`chatops audit verify`). 200 examples in CI (about 3 min on 2 cores), 1,000 with
`CHATOPS_SLOW=1`, or `CHATOPS_STATEFUL_EXAMPLES=N`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.app import App
from bot.cli_audit import audit_verify
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, IncomingMessage
from storage.audit_keys import default_key_file, load_keys
from storage.models import Approval, InboxEvent, Run
from storage.sessions import DbSession
from tests.fakes.openai_server import Reply, calls, text
from tests.fault_helpers import ALICE, FaultChannel, LockHolder, Stages, message, settle

EXAMPLES = int(os.environ.get("CHATOPS_STATEFUL_EXAMPLES", "1000" if os.environ.get("CHATOPS_SLOW") == "1" else "200"))
LEASE = 1.0
FAST = ["approve", "reject", "redeliver", "double_click", "second_replica", "follow_up"]
SLOW = ["restart", "locked_click", "lease_expiry"]
OPS = st.lists(st.sampled_from(FAST * 4 + SLOW), min_size=1, max_size=4)


def respond(body: dict[str, Any]) -> Reply:
    if body["messages"][-1]["role"] == "tool":
        return text("done")
    return calls(("store_note", {"topic": "x"}))


class World:
    """Up to two replicas on one SQLite file, sharing one test toolset that records every run."""

    def __init__(self, bots: Any, path: Path) -> None:
        self.bots, self.path, self.url = bots, path, f"sqlite:///{path}"
        self.stages = Stages()
        self.apps: list[App] = []
        self.rng = random.Random(0)
        self.unsettled: list[str] = []  # conversations that never ended (liveness), for the report

    async def add(self) -> App:
        env = {"CHATOPS_LEASE_SECONDS": str(LEASE), "CHATOPS_SWEEP_INTERVAL": "0.2"}
        app = await self.bots.start(toolsets=[self.stages.toolset()], database_url=self.url, **env)
        app.ctx.channels["faulty"] = FaultChannel()
        await self.bots.run(app)
        self.apps.append(app)
        return app

    def any(self) -> App:
        return self.rng.choice(self.apps)

    async def restart(self) -> None:
        old = self.apps.pop(self.rng.randrange(len(self.apps)))
        await old.stop()
        self.bots.apps.remove(old)
        await self.add()

    async def stop(self) -> None:
        for app in self.apps:
            await app.stop()
            self.bots.apps.remove(app)
        self.apps.clear()


async def retried(call: Any) -> Any:
    """What a platform (redelivery) or a user (clicking again) does when the bot answered an error."""
    for _ in range(20):
        try:
            return await call()
        except StorageError:
            continue
    raise AssertionError("never recorded")


async def of_conversation(app: App, conv: str) -> tuple[dict[str, str], list[str]]:
    async def query(session: DbSession) -> tuple[dict[str, str], list[str]]:
        runs = (await session.execute(sa.select(Run.id, Run.status).where(Run.conversation_key == conv))).all()
        ids = [r for r, _ in runs]
        rows = (await session.execute(sa.select(Approval.id, Approval.status).where(Approval.run_id.in_(ids)))).all()
        return {a: str(s) for a, s in rows}, [str(s) for _, s in runs]

    return await app.ctx.db.run(query, read=True)


async def decide(world: World, conv: str, approve: bool, app: App | None = None) -> None:
    await settle(*world.apps)
    approvals, _ = await of_conversation(world.any(), conv)
    for approval_id, status in approvals.items():
        if status == "pending":
            target = app or world.any()
            request = DecisionRequest(approval_id, ALICE, approve=approve)
            await retried(lambda t=target, r=request: t.core.decide(r))


async def hold_lock(world: World, seconds_or_click: Any) -> None:
    holder = LockHolder(str(world.path))
    try:
        await holder.hold()
        await seconds_or_click()
        await holder.release()
    finally:
        holder.kill()


async def play(world: World, op: str, msg: IncomingMessage) -> None:
    conv = msg.conversation_key
    if op == "approve":
        await decide(world, conv, True)
    elif op == "reject":
        await decide(world, conv, False)
    elif op == "redeliver":
        assert await retried(lambda: world.any().core.accept_message(msg)) is False
    elif op == "double_click":
        await settle(*world.apps)
        first, second = world.apps[0], world.apps[-1]
        await asyncio.gather(decide(world, conv, True, first), decide(world, conv, True, second))
    elif op == "second_replica" and len(world.apps) < 2:
        await world.add()
    elif op == "follow_up":
        await retried(lambda: world.any().core.accept_message(message("and another note", conversation=conv)))
    elif op == "restart":
        await world.restart()
    elif op == "locked_click":
        clicking = asyncio.ensure_future(decide(world, conv, True))
        await hold_lock(world, lambda: asyncio.wait({clicking}, timeout=0.3))
        await clicking
    elif op == "lease_expiry":
        await retried(lambda: world.any().core.accept_message(message("one more", conversation=conv)))
        await hold_lock(world, lambda: asyncio.sleep(LEASE * 1.5))  # the fault: longer than any lease


async def ended(world: World, conv: str) -> tuple[dict[str, str], list[str]]:
    """Settle until every approval is decided and every run has ended (rejecting leftovers)."""
    try:
        async with asyncio.timeout(60):
            return await _settled(world, conv)
    except TimeoutError:
        approvals, runs = await of_conversation(world.any(), conv)
        world.unsettled.append(f"{conv}: {await dump(world.any(), conv)}")
        return approvals, runs


async def dump(app: App, conv: str) -> str:
    """Every row of the conversation, for the report of a conversation that never settled."""

    async def query(session: DbSession) -> str:
        runs = (await session.execute(sa.select(Run).where(Run.conversation_key == conv))).scalars().all()
        ids = [r.id for r in runs]
        approvals = (await session.execute(sa.select(Approval).where(Approval.run_id.in_(ids)))).scalars().all()
        inbox = (await session.execute(sa.select(InboxEvent).where(InboxEvent.conversation_key == conv))).scalars().all()
        return "\n".join(
            [f"now={app.ctx.clock()}"]
            + [f"run {r.id} {r.status} step={r.step} owner={r.owner} lease={r.lease_until} v={r.version}" for r in runs]
            + [f"approval {a.id} run={a.run_id} {a.status} lease={a.lease_until} votes={a.votes}" for a in approvals]
            + [f"inbox {i.id} {i.status} run={i.run_id}" for i in inbox]
        )

    return await app.ctx.db.run(query, read=True)


async def _settled(world: World, conv: str) -> tuple[dict[str, str], list[str]]:
    while True:
        await settle(*world.apps)
        approvals, runs = await of_conversation(world.any(), conv)
        if "pending" in approvals.values():
            await decide(world, conv, False)
            continue
        if all(s in ("done", "failed") for s in runs) and not {"approved", "executing"} & set(approvals.values()):
            return approvals, runs
        with contextlib.suppress(TimeoutError):  # leases and grace periods run out with time: a sweep's pause
            await asyncio.wait_for(world.apps[0].sweeper._stop.wait(), 0.2)


@pytest.fixture
async def world(bots, model, tmp_path):
    model.responder = respond
    w = World(bots, tmp_path / "stateful.db")
    await w.add()
    yield w
    await w.stop()
    out = io.StringIO()
    keys = load_keys(None, default_key_file(w.url), create=False)  # the ring the bots wrote the log with
    assert await asyncio.to_thread(audit_verify, w.url, None, keys, out), out.getvalue()


@pytest.mark.long
@pytest.mark.timeout(1200)  # 200 examples take about 3 minutes on 2 cores; more with CHATOPS_STATEFUL_EXAMPLES
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@example(ops=["double_click", "double_click", "lease_expiry", "second_replica"])
@given(ops=OPS)
async def test_any_sequence_of_deliveries_clicks_and_faults_keeps_the_invariants(world, ops):
    world.unsettled.clear()
    msg = message("store a note")
    await retried(lambda: world.any().core.accept_message(msg))
    for op in ops:
        await play(world, op, msg)
    approvals, runs = await ended(world, msg.conversation_key)
    for approval_id, status in approvals.items():
        ran = world.stages.runs.count(approval_id)
        assert ran <= 1, (approval_id, ran, ops)
        if status == "succeeded":
            assert ran == 1, (approval_id, ops)
        if status in ("rejected", "cancelled", "expired"):
            assert ran == 0, (approval_id, status, ops)
    assert not world.unsettled, f"liveness: a conversation never ended after {ops}:\n{world.unsettled[-1]}"
    assert runs and all(s in ("done", "failed") for s in runs), (runs, ops)
