"""Acks first on SQLite across processes (`storage.turnstile`), checked from outside: another process
holds the turnstile (a front waiting for the write lock) or SQLite's write lock itself; and a front's
commits never checkpoint the write-ahead log (the workers' do)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa

from storage.engine import Database
from storage.sessions import DbSession
from storage.turnstile import Turnstile
from tests.fault_helpers import LockHolder

_TURNSTILE_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1] + "-acks", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()  # held until the test says so, or the process is killed
    """
)


def make_database(tmp_path) -> str:
    path = str(tmp_path / "acks.db")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, what TEXT, blob BLOB)")
    return path


def insert(what: str, size: int = 0) -> Callable[[DbSession], Awaitable[object]]:
    async def step(session: DbSession) -> object:
        return await session.execute(sa.text("INSERT INTO t (what, blob) VALUES (:w, :b)"), {"w": what, "b": b"x" * size})

    return step


def written(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [what for (what,) in conn.execute("SELECT what FROM t ORDER BY n")]


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("front_ends", ["lets go", "is killed"])
async def test_background_writes_wait_while_a_front_holds_the_turnstile_and_acks_go_first(tmp_path, front_ends):
    path = make_database(tmp_path)
    db = Database(f"sqlite:///{path}")
    front = subprocess.Popen(
        [sys.executable, "-c", _TURNSTILE_HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert (await asyncio.to_thread(front.stdout.readline)).strip() == "held"  # type: ignore[union-attr]
        background = asyncio.create_task(db.run(insert("background")))
        await db.run(insert("ack"), urgent=True)  # this process's own ack is not queued behind it
        assert not background.done()
        if front_ends == "lets go":
            front.communicate("\n", timeout=30)
        else:
            front.send_signal(signal.SIGKILL)  # flock ends with its process: nothing stays held
            front.wait(30)
        await asyncio.wait_for(background, 30)
        assert written(path) == ["ack", "background"]
    finally:
        if front.poll() is None:
            front.kill()
            front.wait(30)
        await db.dispose()


async def test_an_ack_waiting_for_the_write_lock_holds_the_turnstile_until_it_has_the_lock(tmp_path):
    path = make_database(tmp_path)
    db = Database(f"sqlite:///{path}")
    holder, probe = LockHolder(path), Turnstile(path)  # the probe: a worker process's view
    await holder.hold()
    try:
        ack = asyncio.create_task(db.run(insert("ack"), urgent=True))
        await until(lambda: not probe.free())
        await holder.release()
        await asyncio.wait_for(ack, 30)
        assert probe.free()
        assert written(path) == ["ack"]
    finally:
        holder.kill()
        probe.close()
        await db.dispose()


async def test_a_turnstile_file_that_cannot_be_opened_is_logged_once_and_writes_go_on(tmp_path, caplog):
    path = make_database(tmp_path)
    os.symlink(tmp_path / "gone" / "acks", path + "-acks")  # its directory does not exist: it cannot be created
    db = Database(f"sqlite:///{path}")
    try:
        await db.run(insert("ack"), urgent=True)
        await db.run(insert("background"))
    finally:
        await db.dispose()
    assert written(path) == ["ack", "background"]
    assert [r.getMessage() for r in caplog.records if "acks do not go first" in r.getMessage()] == [
        f"{path}-acks cannot be opened (No such file or directory): acks do not go first across processes"
    ]


@pytest.mark.parametrize("checkpoints", [False, True])
async def test_a_front_never_checkpoints_the_wal_in_its_commits(tmp_path, checkpoints):
    """6 MB written in 100 commits: past SQLite's autocheckpoint (1,000 pages, ~4 MB), a commit copies
    the log into the database file, unless the process's commits may not (a front's)."""
    path = make_database(tmp_path)
    db = Database(f"sqlite:///{path}", checkpoints=checkpoints)
    try:
        for i in range(100):
            await db.run(insert(f"row {i}", size=64 * 1024))
        database_file = os.path.getsize(path)  # before the last connection closes (which checkpoints)
    finally:
        await db.dispose()
    assert (database_file > 1_000_000) is checkpoints, database_file
