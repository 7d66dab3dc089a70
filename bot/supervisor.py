"""The worker processes of `chatops serve --workers N`: start them, restart one that dies (with
backoff, logged), stop them all within a bound.

Each worker is `chatops worker` in a process of its own (its own event loop, database pool and
model client); it inherits stderr (its log lines go where the front's go) and the environment
(settings, `PROMETHEUS_MULTIPROC_DIR`), and the write end of a pipe on which it says, with one
byte, that it is ready (started, recovered, listening for wake-ups): until one worker has, the
front's `/readyz` says no, so a load balancer or a deploy waits for a process that will do the
work. Its stdin is a pipe the supervisor never writes: when the supervisor dies, even by SIGKILL,
the worker reads end-of-file and stops, so no worker outlives it.
Stopping sends SIGTERM (the worker finishes or hands back what it holds), then SIGKILL to any
worker still running at the deadline.

While a worker is missing (from its death until its replacement is ready), `nudge` (the front's
wake-up) is called every `GAP_NUDGE` seconds and once more when the replacement is ready: each
worker starts at once only its share of the queued conversations, so without it a message in the
missing worker's share would wait for the periodic sweep. An idle worker starts another's share
once it has waited that grace; the replacement starts its own as soon as it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("chatops.supervisor")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0
STEADY_AFTER = 60.0  # a worker that ran this long before dying restarts without backoff
GAP_NUDGE = 0.5  # seconds between wake-ups while a worker is missing: the share grace (`bot.core.sweeper.SHARE_GRACE`)
WORKER_COMMAND = [sys.executable, "-c", "from bot.cli import main; main()"]


class Workers:
    """N supervised worker processes."""

    def __init__(
        self,
        count: int,
        args: list[str],
        on_exit: Callable[[int], None] | None = None,
        command: list[str] | None = None,
        nudge: Callable[[], None] | None = None,
    ) -> None:
        self.count = count
        self.args = args  # the `chatops ... worker` arguments after the interpreter
        self.on_exit = on_exit  # called with the pid of every worker that ended (metrics clean-up)
        self.command = command or WORKER_COMMAND
        self.nudge = nudge  # wakes every worker (the front's notifier)
        self._covering: dict[int, asyncio.Task[None]] = {}
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: set[asyncio.subprocess.Process] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._first_ready = asyncio.Event()

    @property
    def alive(self) -> int:
        return sum(1 for p in self.procs.values() if p.returncode is None)

    @property
    def ready(self) -> int:
        """Workers alive that said they are ready."""
        return sum(1 for p in self._ready if p.returncode is None)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.returncode is None]

    def kill_if_stopped(self, pid: int | None) -> bool:
        """Kill worker `pid` if it is stopped (SIGSTOP: it can neither finish nor let go of what it
        holds, such as SQLite's write lock); the kernel frees its locks and it is restarted. True if killed."""
        if pid is None or pid not in self.pids() or _state(pid) != "T":
            return False
        log.error("worker pid %d is stopped while holding the database's write lock (acks wait for it): killed", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)
            self._tasks.append(asyncio.create_task(self._watch(index), name=f"watch-worker-{index}"))

    async def _spawn(self, index: int) -> None:
        hear, say = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, *self.args, "--index", str(index), "--of", str(self.count), "--ready-fd", str(say),
                stdin=asyncio.subprocess.PIPE, pass_fds=(say,),
            )  # fmt: skip
        except BaseException:
            os.close(hear)
            raise
        finally:
            os.close(say)
        self.procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)
        task = asyncio.create_task(self._hear_ready(proc, hear), name=f"ready-worker-{index}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _hear_ready(self, proc: asyncio.subprocess.Process, fd: int) -> None:
        """Wait for the worker's one byte (ready) or end of file (it ended first)."""
        loop = asyncio.get_running_loop()
        heard: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                data = os.read(fd, 1)
                if not heard.done():
                    heard.set_result(data)

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        try:
            if await heard and proc.returncode is None:
                self._ready.add(proc)
                self._first_ready.set()
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _watch(self, index: int) -> None:
        loop, pause = asyncio.get_running_loop(), RESTART_FIRST
        while True:
            started = loop.time()
            code = await self.procs[index].wait()
            self._ready.discard(self.procs[index])
            if self.on_exit is not None:
                self.on_exit(self.procs[index].pid)
            if self._stopping.is_set():
                return
            self._cover(index)
            pause = RESTART_FIRST if loop.time() - started >= STEADY_AFTER else pause
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1fs", index, self.procs[index].pid, code, pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
            if self._stopping.is_set():
                return
            pause = min(RESTART_MAX, pause * 2)
            try:
                await self._spawn(index)
            except OSError as exc:
                log.error("worker %d could not be started (%s)", index, exc.strerror)

    def _cover(self, index: int) -> None:
        if self.nudge is None or (index in self._covering and not self._covering[index].done()):
            return
        task = asyncio.create_task(self._nudge_until_replaced(index), name=f"cover-worker-{index}")
        self._covering[index] = task
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _nudge_until_replaced(self, index: int) -> None:
        assert self.nudge is not None
        while not self._stopping.is_set():
            await asyncio.sleep(GAP_NUDGE)
            replaced = self.procs[index] in self._ready and self.procs[index].returncode is None
            self.nudge()
            if replaced:
                return

    async def first_ready(self, within: float) -> bool:
        """Wait until a worker has said it is ready (True), at most `within` seconds (False)."""
        try:
            async with asyncio.timeout(within):
                await self._first_ready.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, budget: float) -> None:
        """SIGTERM every worker; SIGKILL those still running after `budget` seconds."""
        self._stopping.set()
        running = [p for p in self.procs.values() if p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if running:
            _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in running], timeout=budget)
            for proc in running:
                if proc.returncode is None:
                    log.warning("worker pid %d did not stop within %.1fs; killed", proc.pid, budget)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late, timeout=1)
        for task in [*self._tasks, *self._side_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._side_tasks, return_exceptions=True)
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()


def _state(pid: int) -> str | None:
    """A process's state letter from /proc (T: stopped by a signal), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


class WorkersReadiness:
    """`/readyz` source: not ready while no worker process is alive and ready."""

    platform = "workers"

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    async def not_ready(self) -> list[str]:
        if not self.workers.alive:
            return ["no worker process is alive"]
        return [] if self.workers.ready else ["no worker process is ready yet"]


def prepare_run_dir(metrics_dir: str | None = None) -> Path:
    """A private directory for this `chatops serve`: wake-up sockets and (unless the operator set
    PROMETHEUS_MULTIPROC_DIR, `metrics_dir`, in the environment or `.env`) the metrics files of every
    process. Called before prometheus_client is imported (it decides at import whether metrics live
    in files), so this module imports only the standard library."""
    run_dir = Path(tempfile.mkdtemp(prefix="chatops-"))
    prepare_metrics_dir(run_dir, metrics_dir)
    return run_dir


def prepare_metrics_dir(run_dir: Path, given: str | None = None) -> None:
    """Prometheus multiprocess mode for the front and its workers: `PROMETHEUS_MULTIPROC_DIR` (the
    operator's, emptied, or one under `run_dir`), set in this process's environment, which the
    workers inherit. Must run before prometheus_client is imported."""
    given = given or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(given) if given else run_dir / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def forget_metrics_of(pid: int) -> None:
    """A worker ended: drop its live gauges (counters stay, summed into the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
