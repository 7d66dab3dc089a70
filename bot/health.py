"""The operator's HTTP endpoints, served in every mode: `/healthz`, `/readyz`, `/metrics`.

- `GET /healthz`: the process is alive and its event loop answers. It touches no lock, no
  database and no platform: an orchestrator restarts the process when this fails.
- `GET /readyz`: 200 only when the database answers and every configured channel says it is
  ready (`Readiness.problems`); otherwise 503 with `{"ready": false, "problems": {name: why}}`.
  A load balancer stops sending traffic when this fails; so does a replica that is stopping.
- `GET /metrics`: Prometheus text (`bot.core.metrics.render`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import sqlalchemy as sa
from aiohttp import web

from bot.core import metrics
from storage.engine import Database

DB_TIMEOUT = 3.0
BUSY_ATTEMPTS, BUSY_PAUSE = 20, 0.05
CHECK_TIMEOUT = 5.0


class ReadinessSource(Protocol):
    """Something that can say why it is not ready (an adapter)."""

    platform: str

    async def not_ready(self) -> list[str]:
        """Problems, each one short sentence; empty when ready."""


async def database_problem(db: Database) -> str | None:
    """None when `SELECT 1` succeeds within `DB_TIMEOUT` on a fresh pool checkout (no write lock)."""
    try:
        if db.is_sqlite:
            sync_engine = db.sync_engine.execution_options(chatops_read=True)  # a plain BEGIN: never the write lock

            def ping() -> None:
                # Other processes (workers, replicas) write too: a moment of SQLITE_BUSY while one of
                # them checkpoints the WAL is not "not ready"; look again until the time bound.
                for attempt in range(BUSY_ATTEMPTS):
                    try:
                        with sync_engine.connect() as conn:
                            conn.execute(sa.text("SELECT 1 FROM alembic_version"))
                        return
                    except sa.exc.OperationalError as exc:
                        if attempt + 1 == BUSY_ATTEMPTS or not ("locked" in str(exc) or "busy" in str(exc)):
                            raise
                        time.sleep(BUSY_PAUSE)

            await asyncio.wait_for(asyncio.to_thread(ping), DB_TIMEOUT)
        else:
            assert db.engine is not None
            async with asyncio.timeout(DB_TIMEOUT):
                async with db.engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1 FROM alembic_version"))
    except TimeoutError:
        return f"the database did not answer within {DB_TIMEOUT:.0f}s"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the type is enough to say why
        return f"the database cannot be queried ({type(exc).__name__})"
    return None


class Readiness:
    """Collects the problems of the database and of every registered source."""

    def __init__(self, db: Database, sources: Callable[[], list[ReadinessSource]], stopping: Callable[[], bool]) -> None:
        self.db = db
        self.sources = sources
        self.stopping = stopping

    async def problems(self) -> dict[str, str]:
        if self.stopping():
            return {"process": "stopping"}
        found: dict[str, str] = {}
        db_problem = await database_problem(self.db)
        if db_problem:
            found["database"] = db_problem
        for source in self.sources():
            try:
                issues = await asyncio.wait_for(source.not_ready(), CHECK_TIMEOUT)
            except TimeoutError:
                issues = ["the readiness check did not answer in time"]
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                issues = [f"the readiness check failed ({type(exc).__name__})"]
            if issues:
                found[source.platform] = "; ".join(issues)
        return found


def health_routes(readiness: Readiness, replica: str) -> list[web.RouteDef]:
    """The three endpoints, bound to one bot."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "replica": replica})

    async def readyz(_: web.Request) -> web.Response:
        problems = await readiness.problems()
        if problems:
            return web.json_response({"ready": False, "replica": replica, "problems": problems}, status=503)
        return web.json_response({"ready": True, "replica": replica})

    async def metrics_page(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.render)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    handlers: list[tuple[str, Callable[[web.Request], Awaitable[web.Response]]]] = [
        ("/healthz", healthz),
        ("/readyz", readyz),
        ("/metrics", metrics_page),
    ]
    return [web.get(path, handler) for path, handler in handlers]
