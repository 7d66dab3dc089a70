"""Wake-up signals from the front process (which records work) to the worker processes (which
claim it), so a worker starts within milliseconds instead of at its next sweep.

- PostgreSQL: `NOTIFY chatops_work` after the front's commit; every worker of every machine on
  that database holds a `LISTEN chatops_work` connection. A dropped LISTEN connection is logged
  and reconnected with backoff; meanwhile (and always) the sweep finds the work anyway.
- SQLite (one machine): the supervisor makes a private directory; each worker binds a Unix
  datagram socket there and the front sends one byte to each socket it finds.

A signal carries nothing: it only says "look at the database now". A lost one costs at most one
`CHATOPS_SWEEP_INTERVAL` (plus the sweeper's two-second grace for queued messages), never work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

log = logging.getLogger("chatops.wake")

CHANNEL = "chatops_work"
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 10.0


# ---------------------------------------------------------------------- PostgreSQL
def libpq_url(url: URL) -> str:
    """The SQLAlchemy URL as a libpq connection string (psycopg's own `connect` takes it)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class PgNotifier:
    """The front's side: `wake()` sends one NOTIFY on a connection of its own (coalesced: a burst
    of commits sends one or two)."""

    def __init__(self, url: URL) -> None:
        self.conninfo = libpq_url(url)
        self._conn: Any = None
        self._again = False
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._send(), name="notify-workers")

    async def _send(self) -> None:
        import psycopg

        self._again = True
        while self._again:
            self._again = False
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
                await self._conn.execute(f"NOTIFY {CHANNEL}")
            except Exception as exc:  # noqa: BLE001 - the workers' sweep finds the work anyway
                log.warning("could not notify the workers (%s); they will find the work at their next sweep", type(exc).__name__)
                await self.close()
                return

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


async def listen_pg(url: URL, on_wake: Callable[[], None], stopped: asyncio.Event) -> None:
    """The worker's side: call `on_wake()` on every notification until `stopped` is set; reconnect
    (logged, with backoff) whenever the connection drops, waking once per attempt meanwhile (a poll)
    and once more when listening again, for whatever was notified while nobody listened."""
    import psycopg

    pause, conninfo, lost = RECONNECT_FIRST, libpq_url(url), False
    while not stopped.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                if lost:
                    log.info("listening for work again (LISTEN %s)", CHANNEL)
                pause, lost = RECONNECT_FIRST, False
                on_wake()
                async for _ in conn.notifies():
                    on_wake()
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect; the sweep covers the gap
            if stopped.is_set():
                return
            log.warning("the LISTEN connection failed (%s); reconnecting in %.1fs, polling meanwhile", type(exc).__name__, pause)
            lost = True
            on_wake()  # poll once per attempt: work signalled while nobody listened is not left to the sweep
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), pause)
            pause = min(RECONNECT_MAX, pause * 2)


# ---------------------------------------------------------------------- SQLite (local sockets)
def socket_path(directory: Path, index: int) -> Path:
    """Where worker `index` listens for wake-ups."""
    return directory / f"worker-{index}.sock"


class SocketNotifier:
    """The front's side on SQLite: one datagram to each of the `count` worker sockets in `directory`
    (their paths worked out once: looking for them on every signal was an eighth of the front's CPU)."""

    def __init__(self, directory: Path, count: int) -> None:
        self.paths = [str(socket_path(directory, index)) for index in range(count)]
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def wake(self) -> None:
        for path in self.paths:
            # A full buffer means that worker has wake-ups waiting; a dead one (no socket) is restarted.
            with contextlib.suppress(OSError):
                self._sock.sendto(b"w", path)

    async def close(self) -> None:
        self._sock.close()


class SocketListener:
    """The worker's side on SQLite: a datagram socket at `path`; each readable burst wakes once."""

    def __init__(self, path: Path, on_wake: Callable[[], None]) -> None:
        self.path = path
        self.on_wake = on_wake
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._sock.recv(64):
                pass
        self.on_wake()

    async def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self.path.unlink(missing_ok=True)
