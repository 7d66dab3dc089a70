"""Working lines held back until a run has worked `CHATOPS_PROGRESS_AFTER`.

A run that answers within that time shows no progress message at all (its answer is the one
post), and costs no transaction for lines nobody would have seen. A line still wanted when the
time comes is queued through the outbox, fenced by the run's claim: if the run paused, ended or
was taken over meanwhile, nothing is queued. Held lines live only in this process, on purpose:
they are a courtesy, and a run taken over elsewhere shows its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from bot.core.context import AppContext
from bot.core.run_store import RunClaim

QueueLine = Callable[[RunClaim, str], Coroutine[Any, Any, None]]


@dataclass
class _Held:
    claim: RunClaim
    line: str
    timer: asyncio.TimerHandle


class HeldLines:
    """The newest held line of each run this process drives, and the timer that releases it."""

    def __init__(self, ctx: AppContext, queue: QueueLine) -> None:
        self.ctx = ctx
        self._queue = queue  # queues a line if the claim still holds (the run's store fences it)
        self._held: dict[str, _Held] = {}

    def offer(self, claim: RunClaim, line: str) -> bool:
        """Hold `line` if the run has not yet worked long enough (True); False: queue it now."""
        now = self.ctx.clock()
        if claim.progress_from is None or now >= claim.progress_from:
            return False
        held = self._held.get(claim.run_id)
        if held is not None:
            held.claim, held.line = claim, line
            return True
        delay = (claim.progress_from - now).total_seconds()
        timer = asyncio.get_running_loop().call_later(delay, self._release, claim.run_id)
        self._held[claim.run_id] = _Held(claim, line, timer)
        return True

    def drop(self, run_id: str) -> None:
        """The claim's drive ended (answer, pause, failure, lost lease): its held line is not wanted."""
        held = self._held.pop(run_id, None)
        if held is not None:
            held.timer.cancel()

    def _release(self, run_id: str) -> None:
        held = self._held.pop(run_id, None)
        if held is not None:
            self.ctx.tasks.spawn(self._queue(held.claim, held.line), name="progress-line")
