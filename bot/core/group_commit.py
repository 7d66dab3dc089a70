"""Group commit: callers that arrive while a transaction writes for others wait for the next one,
which writes for all of them. At rest each caller has a transaction of its own (no added latency);
under load one transaction (one commit, one fsync on SQLite, one set of round trips on PostgreSQL)
serves many. Each caller gets the outcome the write gave its item (the intake's: new or duplicate),
or the exception of the transaction that carried it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from bot.core.context import TaskSet

T = TypeVar("T")
R = TypeVar("R")


def _settle(done: asyncio.Future[R], outcome: R | BaseException) -> None:
    """Give a waiting caller its outcome: a result, or the exception the transaction raised."""
    if done.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        done.cancel()
    elif isinstance(outcome, BaseException):
        done.set_exception(outcome)
        done.add_done_callback(lambda f: f.exception())  # retrieved even if its caller gave up
    else:
        done.set_result(outcome)


class GroupCommit(Generic[T, R]):
    """`await batches.submit(item)` returns the outcome `write(items)` gave `item` (one per item, in
    order: a result, or an exception for that item alone) once that write is done, or raises what the
    write raised. `write` runs its own transaction(s) over at most `limit` items."""

    def __init__(
        self,
        tasks: TaskSet,
        name: str,
        write: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        limit: int = 200,
    ) -> None:
        self._tasks, self._name, self._write, self._limit = tasks, name, write, limit
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writing = False

    async def submit(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if not self._writing:
            self._writing = True
            self._tasks.spawn(self._write_all(), name=self._name)
        return await asyncio.shield(done)  # a caller that gives up does not cancel the others' transaction

    async def _write_all(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._limit], self._waiting[self._limit :]
                outcomes: Sequence[R | BaseException]
                try:
                    outcomes = await self._write([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller of this batch learns it
                    outcomes = [exc] * len(batch)
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    _settle(done, outcome)
                batch = []
        except BaseException as exc:  # cancelled at shutdown: nobody is left waiting for an answer
            for _, done in [*batch, *self._waiting]:
                _settle(done, exc)
            self._waiting = []
            raise
        finally:
            self._writing = False
