"""How many new runs this process drives at once: as many as stay quick.

A process driving more runs than its CPU keeps up with makes every one of them slow: each outlives
`CHATOPS_PROGRESS_AFTER`, so it shows working lines and stores every step, which is more work still
and fewer turns per second. So a new run takes a slot, and the number of slots follows how much of
the process's own time runs take (a run's time minus its waits for the model and its tools): one
slot more after a run that stayed quick, a quarter fewer after one that did not, and as many as at
start once the process is idle again. A slow run whose model and tools alone took longer than
`CHATOPS_PROGRESS_AFTER` takes no slot away (no number of slots would have kept it quick), so a slow
model never shrinks the slots.

A run that has held its slot for `STALE_AFTER` no longer counts (a stuck tool must not keep new runs
out). Nothing waits here that the database does not hold too: a conversation waiting for a slot keeps
its messages queued in the inbox, where another worker or replica may claim them first, and where
the sweeper finds them after a crash.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

MIN_SLOTS, FIRST_SLOTS, MAX_SLOTS = 4, 256, 4096
MIN_QUICK = 0.2  # seconds of own time a run may always take and count as quick
STALE_AFTER = 30.0  # a run in its slot this long waits on something else: its slot counts as free


@dataclass(eq=False)
class RunTime:
    """One run's times: since it took its slot, and waiting outside (the model, its tools)."""

    started: float
    outside: float = 0.0
    ran: bool = False  # a run was started (not: nothing was queued, or another run holds the conversation)

    def own(self) -> float:
        return time.monotonic() - self.started - self.outside


_CURRENT: ContextVar[RunTime | None] = ContextVar("chatops_run_time", default=None)


@contextmanager
def outside() -> Iterator[None]:
    """Waiting on something outside the process (the model, a tool): not the run's own time."""
    started = time.monotonic()
    try:
        yield
    finally:
        timing = _CURRENT.get()
        if timing is not None:
            timing.outside += time.monotonic() - started


class RunSlots:
    """`async with slots.run() as timing:` around starting and driving one run."""

    def __init__(self, progress_after: float) -> None:
        self.progress_after = progress_after
        self.quick = max(MIN_QUICK, progress_after / 2)
        self.limit = FIRST_SLOTS
        self._active: set[RunTime] = set()
        self._waiting: collections.deque[tuple[asyncio.Future[None], RunTime]] = collections.deque()

    @property
    def busy(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """No run holds or waits for a slot here."""
        return not self._active and not self._waiting

    @asynccontextmanager
    async def run(self) -> AsyncIterator[RunTime]:
        timing = RunTime(time.monotonic())
        await self._take(timing)
        token = _CURRENT.set(timing)
        try:
            yield timing
        finally:
            _CURRENT.reset(token)
            self._active.discard(timing)
            if timing.ran:
                self._learn(timing)
            if self.idle:
                self.limit = max(self.limit, FIRST_SLOTS)  # idle again: the next burst starts wide
            self._let_in()

    def _working(self) -> int:
        """Runs holding a slot, but those that have held it `STALE_AFTER`: they wait on something
        else (a stuck tool, a slow database), and a hung run must not keep new runs out."""
        now = time.monotonic()
        return sum(1 for t in self._active if now - t.started < STALE_AFTER)

    async def _take(self, timing: RunTime) -> None:
        if not self._waiting and self._working() < self.limit:
            self._active.add(timing)
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((turn, timing))
        asyncio.get_running_loop().call_later(STALE_AFTER, self._let_in)  # should every slot go stale
        try:
            await turn  # `_let_in` gave this run its slot when it woke it
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._active.discard(timing)  # woken and cancelled at once: give the slot back
                self._let_in()
            else:
                self._waiting.remove((turn, timing))
            raise
        timing.started = time.monotonic()  # its own time starts with its slot

    def _learn(self, timing: RunTime) -> None:
        if timing.own() <= self.quick:
            self.limit = min(MAX_SLOTS, self.limit + 1)
        elif timing.outside < self.progress_after:  # slow, and not merely for waiting on its model or tools
            self.limit = max(MIN_SLOTS, self.limit * 3 // 4)

    def _let_in(self) -> None:
        while self._waiting and self._working() < self.limit:
            turn, timing = self._waiting.popleft()
            if not turn.done():
                self._active.add(timing)
                turn.set_result(None)
