"""The worker processes of `chatops serve --workers N`: start them, restart one that dies (with
backoff, logged), stop them all within a bound.

Each worker is `chatops worker` in a process of its own (its own event loop, database pool and
model client); it inherits stderr (its log lines go where the front's go) and the environment
(settings, `PROMETHEUS_MULTIPROC_DIR`). Its stdin is a pipe the supervisor never writes: when the
supervisor dies, even by SIGKILL, the worker reads end-of-file and stops, so no worker outlives it.
Stopping sends SIGTERM (the worker finishes or hands back what it holds), then SIGKILL to any
worker still running at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("chatops.supervisor")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0
STEADY_AFTER = 60.0  # a worker that ran this long before dying restarts without backoff
WORKER_COMMAND = [sys.executable, "-c", "from bot.cli import main; main()"]


class Workers:
    """N supervised worker processes."""

    def __init__(self, count: int, args: list[str], on_exit: Callable[[int], None] | None = None) -> None:
        self.count = count
        self.args = args  # the `chatops ... worker` arguments after the interpreter
        self.on_exit = on_exit  # called with the pid of every worker that ended (metrics clean-up)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def alive(self) -> int:
        return sum(1 for p in self.procs.values() if p.returncode is None)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.returncode is None]

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)
            self._tasks.append(asyncio.create_task(self._watch(index), name=f"watch-worker-{index}"))

    async def _spawn(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *WORKER_COMMAND, *self.args, "--index", str(index), "--of", str(self.count), stdin=asyncio.subprocess.PIPE
        )
        self.procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    async def _watch(self, index: int) -> None:
        loop, pause = asyncio.get_running_loop(), RESTART_FIRST
        while True:
            started = loop.time()
            code = await self.procs[index].wait()
            if self.on_exit is not None:
                self.on_exit(self.procs[index].pid)
            if self._stopping.is_set():
                return
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()


class WorkersReadiness:
    """`/readyz` source: not ready while no worker process is alive."""

    platform = "workers"

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    async def not_ready(self) -> list[str]:
        return [] if self.workers.alive else ["no worker process is alive"]


def prepare_metrics_dir(run_dir: Path) -> None:
    """Prometheus multiprocess mode for the front and its workers: `PROMETHEUS_MULTIPROC_DIR` (the
    operator's, emptied, or one under `run_dir`). Must run before prometheus_client is imported."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(given) if given else run_dir / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def forget_metrics_of(pid: int) -> None:
    """A worker ended: drop its live gauges (counters stay, summed into the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
