"""systemd's notifications from a real `chatops serve` (front + workers): READY=1 once it serves,
WATCHDOG=1 from the front's event loop while it turns (none while the process is stopped), STOPPING=1 on
SIGTERM; the workers never speak for the service. The test plays systemd: a Unix datagram socket that
reads each sender's pid (SO_PASSCRED)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.sdnotify import ServiceNotifier
from tests.fakes.slack_api import FakeSlackApi
from tests.slack_helpers import BOT_TOKEN, SIGNING_SECRET
from tests.test_ops_stop import serve

WATCHDOG_USEC = 400_000  # systemd's WatchdogSec=0.4: a ping every 0.2 s


class FakeSystemd:
    """The notification socket: every datagram with the pid that sent it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        with_creds = socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, with_creds)
            except BlockingIOError:
                return
            pid = next(struct.unpack("3i", d)[0] for level, kind, d in ancillary if kind == socket.SCM_CREDENTIALS)
            self.received.put_nowait((pid, data.decode()))

    async def next(self, state: str, timeout: float = 60.0) -> int:
        """The pid of the next datagram saying `state` (others before it are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                pid, said = await self.received.get()
                if said == state:
                    return pid

    def drain(self) -> list[tuple[int, str]]:
        self._read()
        found = []
        while not self.received.empty():
            found.append(self.received.get_nowait())
        return found

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def systemd(tmp_path: Path) -> AsyncIterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def stopped(pid: int) -> None:
    """Until the kernel has stopped `pid` (state T): SIGSTOP is delivered when it next runs."""
    async with asyncio.timeout(10):
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            await asyncio.sleep(0.01)


async def test_ready_watchdog_and_stopping_come_from_the_front_alone(tmp_path, systemd):
    async with FakeSlackApi() as fake:
        env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_API_URL": fake.url}
        env |= {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC), "CHATOPS_WORKERS": "2"}
        bot = await serve(tmp_path, env)
        front = bot.proc.pid
        assert await systemd.next("READY=1") == front
        await bot.wait_line(r"chatops started: Slack; ready")
        for _ in range(3):
            assert await systemd.next("WATCHDOG=1", timeout=10) == front

        workers = children(front)
        assert len(workers) == 2
        for worker in workers:  # the variables were taken out before the workers started
            environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]

        os.kill(front, signal.SIGSTOP)  # a front that does not run sends nothing: systemd would restart it
        await stopped(front)
        systemd.drain()
        with pytest.raises(TimeoutError):
            await systemd.next("WATCHDOG=1", timeout=5 * WATCHDOG_USEC / 2_000_000)
        os.kill(front, signal.SIGCONT)
        assert await systemd.next("WATCHDOG=1", timeout=10) == front

        code, _ = await bot.stop()
        assert await systemd.next("STOPPING=1", timeout=10) == front
        assert code == 0, bot.stderr
        assert {pid for pid, _ in systemd.drain()} <= {front}


def test_nothing_is_sent_unless_systemd_asks_and_the_watchdog_is_for_its_own_pid(tmp_path):
    environ = {"NOTIFY_SOCKET": "@chatops-test", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1", "HOME": "/h"}
    notifier = ServiceNotifier.from_environment(environ)
    assert notifier.address == "\0chatops-test"  # an abstract socket
    assert notifier.interval is None  # the watchdog is another process's
    assert environ == {"HOME": "/h"}  # nobody started from here speaks for the service
    assert ServiceNotifier({"WATCHDOG_USEC": "30000000"}).interval is None  # no socket: nothing to send to
    assert ServiceNotifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}).interval == 15.0
    ServiceNotifier({}).notify("READY=1")  # no socket: nothing happens
    ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).notify("READY=1")  # a gone socket: logged, not raised
