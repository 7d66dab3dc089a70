"""Group memberships for the policy's group entries: fetched from the platform, cached briefly.

What belongs here: the platform-neutral half of resolving `slack-group:` / `feishu-dept:` /
`feishu-group:` entries into `User.groups`. `MembershipCache` maps one key (a user group, a
chat, a user) to a set of ids, fetched at most once per `ttl` seconds (concurrent askers share
one fetch), and answers within a time budget so a click is still answered in time. A fetch that
fails or is too slow answers None, with a warning: the adapter then treats the user as not a
member. Memberships only ever grant a decision, so an unknown membership refuses. A failed key
is not asked again for `RETRY_AFTER` seconds (a refused lookup, say a user outside the app's
contact range, must not cost an API call and a warning on every click). A fetch that outlives
the budget keeps running and fills the cache for the next click. The platform calls
themselves live in the adapters (`bot/slack/groups.py`, `bot/feishu/groups.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

MEMBERS_TTL = 60.0  # seconds a fetched membership is trusted: removal from a group counts within a minute
LOOKUP_BUDGET = 1.0  # seconds a click or a message waits for memberships (platforms want an answer within 3)
RETRY_AFTER = 5.0  # seconds a key whose fetch failed stays unknown before it is asked again
CACHE_SIZE = 10_000

Fetch = Callable[[str], Awaitable[frozenset[str]]]
Describe = Callable[[BaseException], str]


class MembershipCache:
    """`key -> ids` fetched with `fetch(key)`, trusted for `ttl` seconds from the moment of asking."""

    def __init__(
        self,
        what: str,
        fetch: Fetch,
        *,
        log: logging.Logger,
        describe: Describe = lambda exc: type(exc).__name__,
        ttl: float = MEMBERS_TTL,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.fetch = fetch
        self.log = log
        self.describe = describe
        self.ttl = ttl
        self.retry_after = retry_after
        self.clock = clock
        self._values: dict[str, tuple[float, frozenset[str]]] = {}
        self._failed: dict[str, float] = {}
        self._pending: dict[str, asyncio.Task[frozenset[str] | None]] = {}

    async def get(self, key: str, budget: float) -> frozenset[str] | None:
        """The ids for `key`, or None when they could not be read within `budget` seconds."""
        now = self.clock()
        cached = self._values.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        failed_at = self._failed.get(key)
        if failed_at is not None and now - failed_at < self.retry_after:
            return None  # failed moments ago: still unknown, without another call or warning
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key), name=f"members-{key}")
            self._pending[key] = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            self.log.warning("%s %s: no answer within %gs; treating the user as not a member", self.what, key, budget)
            return None

    async def _load(self, key: str) -> frozenset[str] | None:
        asked = self.clock()
        try:
            value = await self.fetch(key)
        except Exception as exc:  # noqa: BLE001 - any failure means "not known to be a member"
            self.log.warning(
                "%s %s could not be read (%s); treating the user as not a member", self.what, key, self.describe(exc)
            )
            if len(self._failed) >= CACHE_SIZE:
                self._failed.clear()
            self._failed[key] = self.clock()
            return None
        finally:
            self._pending.pop(key, None)
        if len(self._values) >= CACHE_SIZE:
            self._values.clear()
        self._values[key] = (asked, value)
        self._failed.pop(key, None)
        return value

    async def close(self) -> None:
        """Cancel fetches still running (the adapter is stopping)."""
        pending = list(self._pending.values())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
