"""Run slots: a process starts only as many runs at once as stay quick (`bot/core/run_slots.py`).

The class is driven as the runner drives it; a slow run is one whose clock started earlier (its
`started` moved back), so nothing here waits on time."""

from __future__ import annotations

import asyncio

from bot.core import run_slots
from bot.core.run_slots import FIRST_SLOTS, MIN_SLOTS, STALE_AFTER, RunSlots


class Run:
    """One run in a slot: `entered` once it has its slot, leaves when `leave` is set, then reports
    `own` seconds of its own time and `outside` seconds waiting on its model (a run that started
    nothing, `ran=False`, reports nothing)."""

    def __init__(self, slots: RunSlots, *, own: float = 0.0, outside: float = 0.0, ran: bool = True) -> None:
        self.entered, self.leave = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._hold(slots, own, outside, ran))

    async def _hold(self, slots: RunSlots, own: float, outside: float, ran: bool) -> None:
        async with slots.run() as timing:
            timing.ran = ran
            self.timing = timing
            self.entered.set()
            await self.leave.wait()
            timing.started -= own + outside
            timing.outside += outside

    async def finish(self) -> None:
        self.leave.set()
        await self.task


async def yielded() -> None:
    """Let every ready task take its next step (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_runs_beyond_the_limit_wait_in_arrival_order_and_enter_as_slots_free():
    slots = RunSlots(progress_after=1.0)
    slots.limit = 2
    runs = [Run(slots, ran=False) for _ in range(4)]  # none reports a time: the limit stays 2
    await runs[0].entered.wait()
    await runs[1].entered.wait()
    await yielded()
    assert (slots.busy, slots.waiting) == (2, 2) and not runs[2].entered.is_set()
    await runs[1].finish()
    await runs[2].entered.wait()  # the first in line, not the last
    assert not runs[3].entered.is_set() and slots.busy == 2
    for run in runs:
        await run.finish()
    assert (slots.busy, slots.waiting) == (0, 0)


async def test_slow_runs_shrink_the_slots_to_a_floor_and_a_quick_one_adds_one():
    slots = RunSlots(progress_after=1.0)
    busy = Run(slots, ran=False)  # keeps the process from going idle (which resets the slots)
    await busy.entered.wait()
    for _ in range(20):
        slow = Run(slots, own=5.0)
        await slow.finish()
    assert slots.limit == MIN_SLOTS
    quick = Run(slots, own=0.0)
    await quick.finish()
    assert slots.limit == MIN_SLOTS + 1
    await busy.finish()


async def test_a_run_slow_only_for_its_model_takes_no_slot_away():
    slots = RunSlots(progress_after=1.0)
    slots.limit = 10
    busy = Run(slots, ran=False)
    await busy.entered.wait()
    await Run(slots, own=5.0, outside=2.0).finish()  # a 2 s model: slow, and no number of slots helps
    assert slots.limit == 10
    await Run(slots, own=0.0, outside=2.0).finish()  # quick but for its model: the slots keep up
    assert slots.limit == 11
    await busy.finish()


async def test_an_idle_process_starts_the_next_burst_wide():
    slots = RunSlots(progress_after=1.0)
    slots.limit = MIN_SLOTS
    await Run(slots, own=5.0).finish()  # the last run: nobody busy, nobody waiting
    assert slots.limit == FIRST_SLOTS
    slots.limit = MIN_SLOTS
    await Run(slots, ran=False).finish()  # a look that found nothing to run leaves it idle too
    assert slots.limit == FIRST_SLOTS


async def test_a_run_cancelled_while_waiting_leaves_the_line_and_takes_no_slot():
    slots = RunSlots(progress_after=1.0)
    slots.limit = 1
    holder = Run(slots)
    await holder.entered.wait()
    waiting = Run(slots)
    await yielded()
    assert slots.waiting == 1
    waiting.task.cancel()
    await asyncio.gather(waiting.task, return_exceptions=True)
    assert (slots.busy, slots.waiting) == (1, 0)
    await holder.finish()
    assert slots.busy == 0


async def test_time_waiting_outside_counts_for_the_run_in_whose_slot_it_was_spent():
    slots = RunSlots(progress_after=1.0)
    reply = asyncio.Event()
    async with slots.run() as timing:

        async def model() -> None:
            with run_slots.outside():
                await reply.wait()

        call = asyncio.create_task(model())  # a task started inside the slot shares its context
        await yielded()
        reply.set()
        await call
    assert timing.outside > 0
    with run_slots.outside():  # outside any slot: nothing to count it for
        pass


async def test_a_run_stuck_in_its_slot_stops_keeping_new_runs_out():
    slots = RunSlots(progress_after=1.0)
    slots.limit = 1
    stuck = Run(slots, ran=False)
    await stuck.entered.wait()
    stuck.timing.started -= STALE_AFTER + 1  # e.g. a tool that never answers
    newer = Run(slots, ran=False)
    await newer.entered.wait()  # at once, not after the stuck one
    assert slots.busy == 2
    await newer.finish()
    await stuck.finish()
