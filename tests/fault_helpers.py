"""Helpers for the fault tests: a test channel with fault hooks, a toolset whose stages can be made
to fail, message delivery straight into the core, settling, and a summary of what the database says.

Faults are injected from outside the core: through these real test classes (a channel, tools), by
ending the bot's PostgreSQL connections from another connection, or by another process holding the
SQLite write lock. Nothing of the bot is patched.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from bot.app import App
from bot.core.events import IncomingMessage, Thread, User
from storage.models import Approval, InboxEvent, OutboxJob, Run
from storage.sessions import DbSession
from tests.support_tools import RecordingChannel
from tools.context import ToolContext
from tools.registry import Toolset

Hook = Callable[[], Awaitable[None]]
PLATFORM = "faulty"
ALICE = User(PLATFORM, "U1", "T1", "alice")
_ids = itertools.count(1)


async def _nothing() -> None:
    return None


class FaultChannel(RecordingChannel):
    """A real `Channel` whose posts first run a hook (which may raise or cut the database), and
    which signals every delivered post so tests wait on events, not sleeps."""

    def __init__(self, platform: str = PLATFORM) -> None:
        super().__init__(platform)
        self.before_card: Hook = _nothing
        self.before_reply: Hook = _nothing
        self.card_attempts = 0
        self.reply_attempts = 0
        self._posted = asyncio.Condition()

    async def _signal(self) -> None:
        async with self._posted:
            self._posted.notify_all()

    async def post_reply(self, thread: Any, text: str) -> None:
        self.reply_attempts += 1
        await self.before_reply()
        await super().post_reply(thread, text)
        await self._signal()

    async def post_card(self, thread: Any, card: Any) -> str:
        self.card_attempts += 1
        await self.before_card()
        message_id = await super().post_card(thread, card)
        await self._signal()
        return message_id

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until `predicate()` holds after some post (raises TimeoutError otherwise)."""
        async with asyncio.timeout(timeout), self._posted:
            await self._posted.wait_for(predicate)


@dataclass
class Stages:
    """A toolset whose stages (check, preview, read tool, write tool) run hooks a test sets.

    `runs` records every start of the write tool with its approval id."""

    check: Hook = _nothing
    preview: Hook = _nothing
    read: Hook = _nothing
    during_write: Hook = _nothing
    runs: list[str | None] = field(default_factory=list)

    def toolset(self) -> Toolset:
        toolset = Toolset("fault-stages")
        stages = self

        async def check(ctx: ToolContext, args: dict[str, Any]) -> None:
            await stages.check()

        async def preview(ctx: ToolContext, args: dict[str, Any]) -> list[str]:
            await stages.preview()
            return [f"will store a note about {args['topic']}"]

        @toolset.tool(read_only=True)
        async def look_up(ctx: ToolContext, topic: str) -> str:
            """Look a topic up.

            Args:
                topic: The topic.
            """
            await stages.read()
            return f"{topic}: nothing known"

        @toolset.tool(check=check, preview=preview, describe=lambda a: f"Store a note about {a['topic']}")
        async def store_note(ctx: ToolContext, topic: str) -> str:
            """Store a note.

            Args:
                topic: The topic of the note.
            """
            stages.runs.append(ctx.approval_id)
            await stages.during_write()
            return f"stored a note about {topic}"

        return toolset


def message(text: str, *, user: User = ALICE, conversation: str | None = None, key: str | None = None) -> IncomingMessage:
    """A message in its own thread (or in `conversation`), with its own delivery key (or `key`)."""
    n = next(_ids)
    conv = conversation or f"{user.platform}:conv-{n}"
    return IncomingMessage(user, text, Thread(user.platform, {"conv": conv}), conv, (key or f"{user.platform}:ev-{n}",))


async def settle(*apps: App) -> None:
    """Run a sweep on every app and wait until none of them has background work left."""
    for _ in range(3):
        for app in apps:
            await app.sweeper.sweep()
        for app in apps:
            await app.ctx.tasks.idle()


async def pending_ids(app: App) -> list[str]:
    async def query(session: DbSession) -> list[str]:
        rows = await session.execute(sa.select(Approval.id).where(Approval.status == "pending").order_by(Approval.created_at))
        return list(rows.scalars().all())

    return await app.ctx.db.run(query, read=True)


@dataclass(frozen=True)
class Summary:
    """What the database says about every run, inbox event, approval and outbox job."""

    runs: Counter[str]
    inbox: Counter[str]
    approvals: dict[str, str]
    outbox: Counter[str]
    outbox_due: int = 0  # pending jobs whose time to be sent has come

    @property
    def stuck(self) -> list[str]:
        """Anything still in a state that needs a live process to move on now. (An outbox job that waits
        for its retry time after a fault is scheduled, not stuck: the delivery loop sends it then.)"""
        out = [f"run {s}" for s in ("running",) if self.runs[s]]
        out += [f"inbox {s}" for s in ("queued",) if self.inbox[s]]  # "running" belongs to a run (maybe waiting)
        out += [f"approval {a} {s}" for a, s in self.approvals.items() if s in ("executing", "approved")]
        out += ["outbox pending"] if self.outbox_due else []
        return out


async def summary(app: App) -> Summary:
    async def query(session: DbSession) -> Summary:
        async def counts(column: Any) -> Counter[str]:
            return Counter(str(s) for s in (await session.execute(sa.select(column))).scalars().all())

        approvals = {a: str(s) for a, s in (await session.execute(sa.select(Approval.id, Approval.status))).all()}
        due = sa.select(sa.func.count()).where(OutboxJob.status == "pending", OutboxJob.next_attempt_at <= app.ctx.clock())
        outbox = await counts(OutboxJob.status)
        return Summary(
            await counts(Run.status),
            await counts(InboxEvent.status),
            approvals,
            outbox,
            (await session.execute(due)).scalar_one(),
        )

    return await app.ctx.db.run(query, read=True)


# ---------------------------------------------------------------------- PostgreSQL
def terminate_backends(postgres_url: str, schema: str) -> int:
    """End every connection of the bot (application_name = the test schema) from another connection."""
    engine = sa.create_engine(sa.make_url(postgres_url.split("?")[0]).set(drivername="postgresql+psycopg"))
    try:
        with engine.begin() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a AND pid <> pg_backend_pid()"
                ),
                {"a": schema},
            ).all()
        return len(rows)
    finally:
        engine.dispose()


def schema_of(postgres_url: str) -> str:
    return postgres_url.rsplit("application_name=", 1)[1].split("&")[0]


# ---------------------------------------------------------------------- SQLite: a lock held by another process
_HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()  # held until the test says so (or closes the pipe)
    conn.execute("ROLLBACK")
    conn.close()
    print("released", flush=True)
    """
)


class LockHolder:
    """Another process that holds the SQLite write lock (`BEGIN IMMEDIATE`) until released."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen[str] | None = None

    async def hold(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = await asyncio.to_thread(self.proc.stdout.readline)  # type: ignore[union-attr]
        assert line.strip() == "locked", line

    async def release(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        assert line.strip() == "released", line
        await asyncio.to_thread(self.proc.wait, 30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class ReadOnlyFile:
    """Makes a SQLite database unwritable from outside, for every connection already open: `chattr +i`
    on the database and its write-ahead log, so each write fails (SQLITE_IOERR_WRITE on open
    connections, SQLITE_READONLY on new ones) while reads go on. The shared-memory index (`-shm`) is
    left alone: an immutable mapped file would end the process with SIGBUS, which is another fault."""

    def __init__(self, path: str) -> None:
        self.files = [path, path + "-wal"]
        self.on = False

    @staticmethod
    def available(path: str) -> str | None:
        """None when `chattr +i` works here, else why not (needs root and a file system with the flag)."""
        try:
            subprocess.run(["chattr", "+i", path], check=True, capture_output=True, text=True)
            subprocess.run(["chattr", "-i", path], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"chattr +i is not possible here: {exc}"
        return None

    async def make_read_only(self) -> None:
        await asyncio.to_thread(subprocess.run, ["chattr", "+i", *self.files], check=True)
        self.on = True

    async def restore(self) -> None:
        await asyncio.to_thread(self.restore_now)

    def restore_now(self) -> None:
        if self.on:
            subprocess.run(["chattr", "-i", *self.files], check=True)
            self.on = False
