"""One retry shape shared by the database layer and the model client: the first attempt runs
outside tenacity, whose machinery costs ~0.1 ms a call while most calls need no second attempt;
a retryable fault hands the call to the retry policy with that fault as its first attempt, so the
policy's pauses, stop and callbacks apply as if it had run that attempt itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying

T = TypeVar("T")


async def first_then_retry(
    call: Callable[[], Awaitable[T]], policy: Callable[[], AsyncRetrying], retryable: Callable[[BaseException], bool]
) -> T:
    """`call()` once; on a fault `retryable` accepts, again under `policy()` (built only then)."""
    try:
        return await call()
    except Exception as exc:
        if not retryable(exc):
            raise
        first_fault: BaseException | None = exc
    async for attempt in policy():
        with attempt:
            if first_fault is not None:
                fault, first_fault = first_fault, None
                raise fault
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")
