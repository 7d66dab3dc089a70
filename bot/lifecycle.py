"""What every long-running `chatops` process shares: the event loop it runs on (`run`,
CHATOPS_EVENT_LOOP), stopping on SIGTERM/SIGINT (with a watchdog
that guarantees the exit), starting its app unless a stop comes first (then freezing the start-up
heap out of the collector's way), and building the configured channel adapters into an app. Used by `bot.cli` (one process) and `bot.cli_workers` (the front and
its workers)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from bot.config import Settings
from bot.core.errors import ConfigError
from bot.sdnotify import ServiceNotifier

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger("chatops")
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """Run a long-running process's main coroutine (`serve`, `worker`) on the event loop
    CHATOPS_EVENT_LOOP names: `auto` (the default) is uvloop where it is installed (it is, except on
    Windows), asyncio's own loop otherwise. uvloop does the same work with less CPU per I/O
    round trip (psycopg's ~40% less; benchmarks/README.md), so more is left for acks and runs."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(main)


def loop_name() -> str:
    """The running event loop's implementation, for the start-up lines: "uvloop" or "asyncio"."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def announce_started(chat_channels: list[str], problems: dict[str, str], service: ServiceNotifier | None = None) -> None:
    """The line that says a front (or the one process) is up: its channels, ready or not, its loop;
    and `READY=1` to systemd when it runs the process (`bot.sdnotify`)."""
    state = f"not ready yet: {problems}" if problems else "ready"
    log.info("chatops started: %s; %s (event loop: %s)", ", ".join(chat_channels), state, loop_name())
    if service is not None:
        service.notify("READY=1")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for `choice` (None: asyncio's default loop)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("CHATOPS_EVENT_LOOP", "is uvloop, but uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


HARD_EXIT_AFTER = 8.5  # seconds after SIGTERM/SIGINT: whatever still runs, the process exits (0)


def _hard_exit() -> None:
    log.warning("stopping took longer than %.1fs; exiting now", HARD_EXIT_AFTER)
    logging.shutdown()
    os._exit(0)


def stop_on_signals(service: ServiceNotifier | None = None, who: str = "chatops") -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event once (and tell systemd `STOPPING=1`); a watchdog then
    guarantees the exit. `who` names this process in the log line (the front and each worker get it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            return
        log.info("%s: %s received: stopping (pid %d)", who, sig.name, os.getpid())
        stop.set()
        if service is not None:
            service.notify("STOPPING=1")
        watchdog = threading.Timer(HARD_EXIT_AFTER, _hard_exit)
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def start(app: App, stop: asyncio.Event, *, serve_http: bool, http_required: bool = True) -> bool:
    """Start `app` unless `stop` comes first (False then). What start-up made (modules, clients,
    catalogues: ~200,000 objects) lives as long as the process: collected once and then frozen out
    of the collector's sight, a full collection no longer walks it (~50 ms each, a pause every ack
    in the process would wait out)."""
    await unless_stopped(app.start(serve_http=serve_http, http_required=http_required), stop)
    if stop.is_set():
        return False
    gc.collect()
    gc.freeze()
    return True


async def unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T | None:
    """The awaitable's result, or None (it is cancelled) when `stop` is set first."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def add_channels(app: App, settings: Settings) -> list[str]:
    """Build the configured channel adapters into `app`; their names."""
    chat_channels = []
    if settings.slack_enabled:
        from bot.slack import SlackAdapter
        from bot.slack.poster import SlackWebPoster
        from bot.toolsetup import http_timeouts

        slack = SlackAdapter(app.core, settings)
        app.add_adapter(slack)
        poster = SlackWebPoster(slack.client, http_timeouts(settings))
        app.use_slack_poster(poster, poster.close)
        chat_channels.append("Slack")
    if settings.feishu_enabled:
        from bot.feishu import FeishuAdapter

        app.add_adapter(FeishuAdapter(app.core, settings))
        chat_channels.append("Feishu")
    return chat_channels
