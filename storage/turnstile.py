"""Acks first on SQLite across processes: while a front waits for the write lock, worker processes
do not begin new write transactions.

SQLite has one writer at a time and no queue: whoever asks first after the lock frees gets it. A
front recording a message (its platform waits for the ack) and worker processes running agents
compete for it, and under load the workers' many short transactions keep the front polling. The
turnstile is an advisory `flock` on a file beside the database (`<database>-acks`):
- a writer whose first `BEGIN IMMEDIATE` found the lock busy and who may not wait long (an ack)
  holds it exclusively while it polls; it never waits for the turnstile itself, but tries again at
  each poll (another such writer holding it already serves the same purpose);
- a background writer passes it (a shared lock taken and dropped at once) before it queues for the
  lock and before each attempt, and while someone holds it waits with short sleeps, so the
  transaction that holds SQLite's lock finishes and the waiting ack comes next.

`flock` locks end with their process, so a front killed while waiting leaves nothing held. A
turnstile file that cannot be opened is logged once and then done without: no write is refused for
it. Only processes on one machine share an SQLite file, and `flock` works between them. An
in-memory database has no turnstile (no other process can open it). In one process, the turnstile
is used by one open file: `free()` says no while this process holds it (a shared lock taken on the
same file would turn the held one into it).
"""

from __future__ import annotations

import logging
import os
import struct
import sys

if sys.platform != "win32":  # no flock there: worker processes are POSIX-only anyway
    import fcntl


log = logging.getLogger("chatops.storage")
# SQLite's WAL write lock: a POSIX lock on byte 120 of `<database>-shm` (unix VFS: UNIX_SHM_BASE + WAL_WRITE_LOCK).
_WAL_WRITE_LOCK_BYTE = 120
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (padded)


class Turnstile:
    """The turnstile of one SQLite file, for one process (one open file: `flock` is per open file)."""

    def __init__(self, database_path: str | None) -> None:
        in_memory = not database_path or database_path == ":memory:" or "mode=memory" in database_path
        self.path = None if in_memory or database_path is None else database_path + "-acks"
        self._fd: int | None = None
        self._held = False

    def _file(self) -> int | None:
        if sys.platform == "win32":
            return None
        if self._fd is None and self.path is not None:
            try:  # read-only is enough for flock; readable by all, so processes of other users share it
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                log.warning("%s cannot be opened (%s): acks do not go first across processes", self.path, exc.strerror)
                self.path = None  # never a write refused for the turnstile's sake
        return self._fd

    def hold(self) -> bool:
        """Hold the turnstile if nobody else does (never waits); True while this process holds it."""
        fd = self._file()
        if fd is None:
            return False
        if not self._held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._held = True
        return True

    def let_go(self) -> None:
        if self._held and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._held = False

    def free(self) -> bool:
        """True unless someone holds the turnstile (a writer that must not wait is waiting)."""
        if self._held:  # by this process: taking a shared lock on the same file would give it up
            return False
        fd = self._file()
        if fd is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        self.let_go()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_lock_holder(database_path: str | None) -> int | None:
    """The pid of another process holding the SQLite file's write lock (WAL mode), or None (free, held
    by this process, not found out). Linux only: `F_GETLK` names the holder of a POSIX lock."""
    if not database_path or not sys.platform.startswith("linux"):
        return None
    try:
        fd = os.open(database_path + "-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        asked = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _WAL_WRITE_LOCK_BYTE, 1, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, asked))
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(pid) if kind != fcntl.F_UNLCK and pid > 0 else None
