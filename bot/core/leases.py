"""Leases: a run or an execution belongs to one replica until its `lease_until` passes.

The owner renews the lease while it works (`LeaseKeeper`); any replica's sweeper takes over a run
whose lease expired, whether or not its owner is alive, and every write of the old owner is fenced
by the version it claimed, so a late writer changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

log = logging.getLogger("chatops.leases")

Renew = Callable[[], Awaitable[bool]]


@asynccontextmanager
async def kept(renew: Renew, period: float, name: str) -> AsyncIterator[None]:
    """Call `renew()` every `period` seconds while the block runs; stop when it returns False
    (the lease was taken over) or the block ends. A failing renewal is logged and retried."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(period)
            try:
                if not await renew():
                    log.warning("lease of %s was taken over; this replica stops renewing it", name)
                    return
            except Exception as exc:  # noqa: BLE001 - the lease simply runs out if the database stays away
                log.warning("could not renew the lease of %s: %s", name, type(exc).__name__)

    task = asyncio.create_task(loop(), name=f"lease-{name}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
