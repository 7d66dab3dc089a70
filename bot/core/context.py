"""`AppContext`: the explicit bundle of dependencies every core component receives.

There are no module-level singletons: tests build a context against their own fakes, and two
contexts (two "replicas") can live in one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bot.config import Settings
from bot.core.channels import Channel
from bot.core.model import ModelClient
from bot.core.policy import Policy
from bot.core.run_slots import RunSlots
from storage.audit import AuditLog
from storage.engine import Database, is_transient
from storage.models import utcnow
from storage.redact import Redactor
from tools.context import ToolContext
from tools.registry import ToolRegistry

log = logging.getLogger("chatops")


class TaskSet:
    """Background tasks started after an ack; tracked so shutdown can wait for them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._coalesced: dict[str, asyncio.Task[Any]] = {}
        self._again: set[str] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def spawn_coalesced(self, key: str, factory: Callable[[], Coroutine[Any, Any, Any]], delay: float = 0.0) -> None:
        """Run `factory()` now (or after `delay`: requests made meanwhile share that run), or once
        more after the running one if it is already running."""
        if key in self._coalesced:
            self._again.add(key)
            return

        async def loop() -> None:
            try:
                while True:
                    if delay:
                        await asyncio.sleep(delay)
                    self._again.discard(key)
                    await factory()
                    if key not in self._again:
                        return
            finally:
                self._coalesced.pop(key, None)

        self._coalesced[key] = self.spawn(loop(), name=key)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            if is_transient(exc):  # a dropped connection, a busy lock: its work is picked up again (sweep, retry)
                log.warning("background task %s stopped on a passing database fault: %s", task.get_name(), type(exc).__name__)
                return
            log.error("background task %s failed: %s", task.get_name(), type(exc).__name__, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """Wait for running tasks (bounded), then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1)

    async def idle(self) -> None:
        """Wait until no background task is running (tests use this instead of sleeping)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))


def new_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(kw_only=True)
class AppContext:
    """Everything the core needs, passed explicitly."""

    settings: Settings
    db: Database
    audit: AuditLog
    redactor: Redactor
    registry: ToolRegistry
    policy: Policy
    model: ModelClient
    tool_context: ToolContext
    run_slots: RunSlots  # how many new runs this process drives at once
    channels: dict[str, Channel] = field(default_factory=dict)
    replica_id: str = field(default_factory=new_replica_id)
    clock: Callable[[], datetime] = utcnow
    tasks: TaskSet = field(default_factory=TaskSet)
    tool_problems: dict[str, str] = field(default_factory=dict)
    delivers_outbox: bool = True  # False in the front process of `chatops serve --workers N`

    def channel(self, platform: str) -> Channel | None:
        return self.channels.get(platform)
