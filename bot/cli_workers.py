"""`chatops serve` with worker processes: the front (channels, acks, the supervisor) and
`chatops worker` (the agent, executions, deliveries). See `bot.supervisor` and `bot.wake`.

The front records each event and signals; it runs no model call, no tool and no delivery. Each
worker claims work from the database, so fronts and workers on any number of machines can share
one PostgreSQL with no other coordination.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

from bot import lifecycle
from bot.config import Settings
from bot.core.sweeper import Share
from bot.lifecycle import add_channels, stop_on_signals, unless_stopped
from bot.sdnotify import ServiceNotifier
from bot.supervisor import Workers, WorkersReadiness, forget_metrics_of
from bot.wake import PgNotifier, SocketListener, SocketNotifier, listen_pg, socket_path
from storage.engine import Database, normalise_url
from storage.turnstile import write_lock_holder

log = logging.getLogger("chatops")
WORKERS_STOP_BUDGET = 7.5  # seconds the workers get after SIGTERM (the front's watchdog fires at 8.5)
WORKER_NICENESS = 5  # added to a worker's niceness: under a full CPU the front (acks) is scheduled first
FIRST_WORKER_WAIT = 30.0  # seconds the start-up line waits for a worker to be ready (the port serves meanwhile)


async def serve_front(
    settings: Settings, count: int, env_file: Path | None, run_dir: Path, stop: asyncio.Event, service: ServiceNotifier
) -> None:
    """Start `count` workers and the channels; serve until `stop`; stop both within the bound."""
    from bot.app import Role, build_app

    urls = normalise_url(settings.database_url)
    notifier = SocketNotifier(run_dir, count) if urls.is_sqlite else PgNotifier(urls.async_url)
    args = [*(["--env-file", str(env_file)] if env_file else []), "worker", "--wake-dir", str(run_dir)]
    workers = Workers(count, args, forget_metrics_of, nudge=notifier.wake)
    app = None
    try:
        app = await unless_stopped(build_app(settings, role=Role.FRONT, wake=notifier.wake), stop)
        if app is None:
            return
        app.ready_sources.append(WorkersReadiness(workers))
        if urls.is_sqlite:
            unstick_acks(app.ctx.db, workers)
        chat_channels = add_channels(app, settings)
        await workers.start()
        started = await lifecycle.start(app, stop, serve_http=True)
        if started:  # acks are served meanwhile: they record, and the workers take it from there
            await unless_stopped(workers.first_ready(FIRST_WORKER_WAIT), stop)
        problems = await unless_stopped(app.readiness().problems(), stop) if started and not stop.is_set() else None
        if problems is None:
            return
        lifecycle.announce_started(chat_channels, problems, service)
        await stop.wait()
    finally:
        await asyncio.gather(*([app.stop()] if app is not None else []), workers.stop(WORKERS_STOP_BUDGET))
        await notifier.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def unstick_acks(db: Database, workers: Workers) -> None:
    """SQLite: when an ack has waited a moment for a write lock that a stopped worker holds, kill that
    worker (it is restarted), so the lock frees within the ack's budget instead of after the stop."""
    path = db.urls.sync_url.database

    def look() -> None:
        workers.kill_if_stopped(write_lock_holder(path))

    db.on_urgent_wait(look)


async def work(settings: Settings, wake_dir: Path, share: Share, ready_fd: int | None = None) -> None:
    """One worker process: listen for wake-ups, recover, then sweep and pick up work (`share`) until
    stopped. Once ready it writes one byte to `ready_fd` (the supervisor's pipe) and closes it."""
    from bot.app import Role, build_app

    os.nice(WORKER_NICENESS)  # the front's acks come first when the CPU is short
    stop = stop_on_signals(who=f"worker {share.index}")
    _stop_when_parent_leaves(stop)
    app = await unless_stopped(build_app(settings, migrate=False, role=Role.WORKER, share=share), stop)
    if app is None:
        return
    listener: SocketListener | None = None
    listening: asyncio.Task[None] | None = None
    try:
        add_channels(app, settings)
        if app.ctx.db.is_sqlite:
            listener = SocketListener(socket_path(wake_dir, share.index), app.sweeper.wake)
        else:
            listening = asyncio.create_task(listen_pg(app.ctx.db.urls.async_url, app.sweeper.wake, stop), name="listen")
        if await lifecycle.start(app, stop, serve_http=False):
            log.info("worker %d ready (event loop: %s)", share.index, lifecycle.loop_name())
            _say_ready(ready_fd)
            await stop.wait()
    finally:
        if listener is not None:
            await listener.close()
        if listening is not None:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
        await app.stop()


def _say_ready(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, b"r")
    except OSError:
        pass  # the supervisor is gone: stdin's end-of-file stops this worker
    finally:
        os.close(fd)


def _stop_when_parent_leaves(stop: asyncio.Event) -> None:
    """The supervisor holds our stdin (a pipe) open: end-of-file means it is gone, so stop too."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return  # not started by a supervisor
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            if os.read(fd, 4096):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(fd)
        if not stop.is_set():
            log.warning("the supervisor is gone: stopping")
            stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
