"""Assembling and running the bot: settings -> database -> tools -> policy -> model -> core ->
channels -> HTTP server -> sweeper, and shutting it all down in reverse order.

An App has a role (`Role`): `inline` does everything in one process (the terminal chat, tests,
`--workers 0`); `front` takes events and acks them (channels, HTTP, no sweeper: its Core signals
the workers); `worker` takes no events and does the work (sweeper, outbox, executions, runs),
its channels opened for delivery only.

Stopping is bounded (`STOP_BUDGET` seconds in all): first no new events (the HTTP server stops
accepting, Socket Mode and the long connection close), then in-flight acks finish, then
background work gets what is left of the budget and the rest is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from aiohttp import web

from bot.config import Settings
from bot.core import metrics
from bot.core.channels import Channel
from bot.core.context import AppContext
from bot.core.engine import Core
from bot.core.errors import ConfigError, StorageError, StorageUnavailable
from bot.core.model import ModelClient
from bot.core.policy import Policy
from bot.core.run_slots import RunSlots
from bot.core.sweeper import EVERY_CONVERSATION, Share, Sweeper
from bot.health import Readiness, ReadinessSource, health_routes
from bot.toolsetup import build_tool_services, mcp_call_timeout, operator_errors
from storage.audit import AuditLog
from storage.audit_anchor import Anchorer
from storage.audit_keys import AuditKeyError, AuditKeys, load_keys
from storage.engine import Database, is_locked, is_transient
from storage.migrate import upgrade
from storage.redact import Redactor
from tools.builtin import builtin_toolsets
from tools.registry import ToolRegistry
from tools.services import SlackPoster

log = logging.getLogger("chatops")
CHAIN_DEBOUNCE = 0.1  # seconds: the commits of a busy moment share one chaining pass
OUTBOX_POLL = 1.0  # seconds between two looks for due outbox jobs (retries, other replicas' leftovers)
STOP_BUDGET = 7.0  # seconds App.stop may take; SIGTERM must end the process within 10
LOCKED_START_WAIT = 60.0  # seconds a start waits for an SQLite file another process keeps locked (systemd allows 120)
LOCKED_START_PAUSE = 1.0  # between two tries (each waits up to storage.engine.SQLITE_BUSY_TIMEOUT_MS itself)
ACK_GRACE = 3.0  # seconds in-flight HTTP requests (acks) get to finish once stopping starts


class Adapter(Channel, Protocol):
    """A channel adapter with a lifecycle (Slack, Feishu). The terminal has its own loop."""

    def routes(self) -> list[web.RouteDef]:
        """HTTP routes to mount on the shared server (empty when not in HTTP mode)."""

    async def start(self) -> None:
        """Connect (Socket Mode, long connection) or prepare clients. Called after the server is up."""

    async def open_for_delivery(self) -> None:
        """Prepare only what posting and updating needs (a worker process takes no events)."""

    async def stop(self) -> None:
        """Stop taking events (disconnect); delivering still works until `close`."""

    async def close(self) -> None:
        """Release what delivering needed (HTTP sessions), once nothing is sent any more."""

    async def not_ready(self) -> list[str]:
        """Why the channel cannot take events now (empty when it can)."""


def audit_keys(settings: Settings) -> AuditKeys:
    """The audit key ring (CHATOPS_AUDIT_KEY, else the key file, created at first start)."""
    env = settings.audit_key.get_secret_value() if settings.audit_key else None
    try:
        return load_keys(env, settings.audit_key_path)
    except (AuditKeyError, OSError) as exc:
        variable = "CHATOPS_AUDIT_KEY" if env else "CHATOPS_AUDIT_KEY_FILE"
        problem = str(exc) if isinstance(exc, AuditKeyError) else f"cannot be created ({type(exc).__name__})"
        raise ConfigError(variable, problem) from None


def load_policy(settings: Settings) -> Policy:
    """The policy file when `CHATOPS_POLICY` is set, else the default."""
    if settings.policy_file is None:
        return Policy()
    from bot.core.policy_file import ReloadingPolicy

    return ReloadingPolicy(settings.policy_file)


class Role(StrEnum):
    INLINE = "inline"
    FRONT = "front"
    WORKER = "worker"


@dataclass
class App:
    """A running bot. `build_app` creates it; `start`/`stop` run it."""

    settings: Settings
    ctx: AppContext
    core: Core
    sweeper: Sweeper
    role: Role = Role.INLINE
    adapters: list[Adapter] = field(default_factory=list)
    ready_sources: list[ReadinessSource] = field(default_factory=list)
    closers: list[Callable[[], Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    stopping: bool = False
    _sweep_task: asyncio.Task[None] | None = None
    _anchorer: Anchorer | None = None
    _anchor_task: asyncio.Task[None] | None = None
    _outbox_task: asyncio.Task[None] | None = None

    def add_adapter(self, adapter: Adapter) -> None:
        self.adapters.append(adapter)
        self.ctx.channels[adapter.platform] = adapter

    def use_slack_poster(self, poster: SlackPoster, close: Callable[[], Any] | None = None) -> None:
        """Let the notification tools post to Slack through `poster` (closed with the bot when `close` is given)."""
        self.ctx.tool_context = replace(self.ctx.tool_context, slack=poster)
        if close is not None:
            self.closers.append(close)

    def readiness(self) -> Readiness:
        return Readiness(self.ctx.db, lambda: [*self.adapters, *self.ready_sources], lambda: self.stopping)

    def web_app(self) -> web.Application:
        application = web.Application(client_max_size=1024 * 1024)
        application.router.add_routes(health_routes(self.readiness(), self.ctx.replica_id))
        for adapter in self.adapters:
            application.router.add_routes(adapter.routes())
        return application

    async def start(self, *, serve_http: bool = True, http_required: bool = True) -> None:
        """Recover leftovers, start every channel, then open the port (a busy port is fatal unless
        `http_required` is False): an event that arrives finds every channel able to take it, so there
        is no start-up window of refusals."""
        try:  # fail closed when the key ring does not fit the chain
            async for attempt in self.ctx.db.attempts():  # a held lock or a dropped connection: again
                with attempt:
                    await self.ctx.audit.chain(self.ctx.db)
        except AuditKeyError as exc:
            raise ConfigError("CHATOPS_AUDIT_KEY", f"does not fit the audit chain: {exc}") from None
        if self.role != Role.FRONT:
            await self.sweeper.sweep()  # recover what a previous process left behind
        for adapter in self.adapters:
            await (adapter.open_for_delivery() if self.role == Role.WORKER else adapter.start())
        if serve_http and self.role != Role.WORKER:
            await self._serve(http_required)
        if self.role != Role.FRONT:
            self._sweep_task = asyncio.create_task(self.sweeper.run_forever(), name="sweeper")
            self._outbox_task = asyncio.create_task(self.core.out.run_forever(OUTBOX_POLL), name="outbox")
        if self.role == Role.WORKER:
            return  # the front anchors the audit chain
        self._anchorer = Anchorer(
            self.ctx.db,
            self.settings.audit_anchor_path,
            self.settings.audit_anchor_interval,
            chain=lambda: self.ctx.audit.chain(self.ctx.db),
        )
        self._anchor_task = asyncio.create_task(self._anchorer.run_forever(), name="audit-anchor")

    async def _serve(self, required: bool) -> None:
        self.runner = web.AppRunner(self.web_app(), access_log=None, shutdown_timeout=ACK_GRACE)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            if not required:
                log.warning("no health/metrics endpoints: cannot listen on port %s (%s)", self.settings.port, exc.strerror)
                return
            raise ConfigError(
                "CHATOPS_PORT", f"cannot listen on {self.settings.host}:{self.settings.port} ({exc.strerror})"
            ) from None
        log.info("listening on http://%s:%s", self.settings.host, self.port)

    @property
    def port(self) -> int:
        """The bound port (useful with CHATOPS_PORT=0 in tests)."""
        if self.runner is None or not self.runner.addresses:
            return self.settings.port
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop taking events, let in-flight acks finish, drain background work, hand runs back;
        bounded by STOP_BUDGET."""
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + STOP_BUDGET
        self.sweeper.stop()
        self.core.out.stop()
        # No new events: close every door at once (HTTP, Socket Mode, long connection).
        doors = [self._bounded(adapter.stop(), ACK_GRACE + 1, f"{adapter.platform} stop") for adapter in reversed(self.adapters)]
        if self.runner is not None:
            doors.append(self._bounded(self.runner.cleanup(), ACK_GRACE + 1, "HTTP server stop"))
        await asyncio.gather(*doors)
        for task, what in ((self._sweep_task, "sweeper stop"), (self._outbox_task, "outbox stop")):
            if task is not None:
                await self._bounded(task, 1, what)
        left = deadline - asyncio.get_running_loop().time()
        await self.ctx.tasks.drain(grace=max(left - 2.5, 0.1))
        await self._bounded(self.core.hand_back(), 1, "handing runs back")
        if self._anchorer is not None and self._anchor_task is not None:
            self._anchorer.stop()
            await self._bounded(self._anchor_task, 0.5, "anchoring stop")
        try:
            await asyncio.wait_for(self.ctx.audit.chain(self.ctx.db), 1)
            if self._anchorer is not None:
                await asyncio.wait_for(self._anchorer.anchor_now(), 0.5)
        except Exception:  # noqa: BLE001 - staged rows stay staged; the next start chains them
            log.warning("could not chain (or anchor) the last audit rows; the next start will")
        try:
            await asyncio.wait_for(self.sweeper.leave(), 0.5)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.warning("could not deregister this replica")
        for adapter in self.adapters:
            await self._bounded(adapter.close(), 0.5, f"closing the {adapter.platform} clients")
        for close in reversed(self.closers):
            result = close()
            if asyncio.iscoroutine(result):
                await self._bounded(result, 1, "closing a tool server")
        await self._bounded(self.ctx.model.close(), 0.5, "closing the model client")
        await self._bounded(self.ctx.db.dispose(), 0.5, "closing the database")

    @staticmethod
    async def _bounded(awaitable: Any, seconds: float, what: str) -> None:
        """Await with a time bound; on timeout or failure, log one line and go on stopping."""
        try:
            await asyncio.wait_for(awaitable, seconds)
        except TimeoutError:
            log.warning("stopping: %s took longer than %.1fs; abandoned", what, seconds)
        except Exception as exc:  # noqa: BLE001 - stopping must go on whatever one part does
            log.warning("stopping: %s failed (%s)", what, type(exc).__name__)


async def _upgrade_when_unlocked(url: str) -> None:
    """Migrate; while another process keeps the SQLite file locked longer than one attempt waits (a
    backup, an operator's shell, a stopped process), wait for it, logged, up to `LOCKED_START_WAIT`.
    Exiting at once would leave the start to a supervisor that may not be there."""
    loop = asyncio.get_running_loop()
    gives_up = loop.time() + LOCKED_START_WAIT
    while True:
        try:
            await asyncio.to_thread(upgrade, url)
            return
        except Exception as exc:
            if not is_locked(exc) or loop.time() > gives_up:
                raise
            log.warning(
                "the database is locked by another process: waiting for it (up to %gs) before starting", LOCKED_START_WAIT
            )
        await asyncio.sleep(LOCKED_START_PAUSE)


async def build_app(
    settings: Settings,
    *,
    migrate: bool = True,
    role: Role = Role.INLINE,
    wake: Callable[[], None] | None = None,
    share: Share = EVERY_CONVERSATION,
) -> App:
    """Wire every component from settings. Raises ChatopsError subclasses with clear messages.
    A `front` app needs `wake` (how its Core signals the workers); a worker gets its `share` of the
    queued conversations."""
    redactor = Redactor(settings.secret_values())
    if migrate:
        try:
            await _upgrade_when_unlocked(settings.database_url)
        except ModuleNotFoundError as exc:  # a postgresql:// URL on an install without the driver
            raise StorageError(
                f"DATABASE_URL: its driver is not installed ({exc.name}); for PostgreSQL install "
                "the extra: pip install 'chatops-agent[postgres]'"
            ) from None
        except Exception as exc:  # noqa: BLE001 - reported to the operator in one line
            error = StorageUnavailable if is_transient(exc) else StorageError  # down for now, or wrong
            raise error(
                f"DATABASE_URL: cannot open or migrate the database ({redactor.redact_text(str(exc).splitlines()[0])})"
            ) from None
    keys = audit_keys(settings)
    redactor.add(keys.secrets())
    # A front's commits never checkpoint SQLite's WAL (an ack would wait for it); its workers' do.
    db = Database(
        settings.database_url, pool_size=settings.db_pool_size, checkpoints=role != Role.FRONT, stall=settings.db_stall_seconds
    )
    db.on_retry(lambda fault: metrics.DB_RETRIES.labels(type(fault).__name__).inc())
    registry = ToolRegistry()
    for toolset in builtin_toolsets():
        for spec in toolset.specs:
            registry.add(spec)
    tools = build_tool_services(settings, db)
    closers: list[Callable[[], Any]] = list(tools.closers)
    tool_problems: dict[str, str] = {}
    if settings.mcp_config is not None:
        from tools.mcp.manager import McpManager

        with operator_errors():
            manager = McpManager.from_file(settings.mcp_config, call_timeout=mcp_call_timeout(settings))
        for spec in await manager.start():
            registry.add(spec)
        tool_problems.update(manager.problems)
        closers.append(manager.close)
    model = ModelClient(
        model=settings.model or "unset",
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        base_url=settings.openai_base_url,
        timeout=settings.model_timeout,
        retries=settings.model_retries,
        redactor=redactor,
    )
    ctx = AppContext(
        settings=settings,
        db=db,
        audit=AuditLog(redactor, keys),
        redactor=redactor,
        registry=registry,
        policy=load_policy(settings),
        model=model,
        tool_context=tools.context,
        run_slots=RunSlots(settings.progress_after),
        tool_problems=tool_problems,
        delivers_outbox=role != Role.FRONT,
    )

    async def chain() -> None:
        await ctx.audit.chain(db)

    if role != Role.FRONT:  # the front's rows are chained by the workers' next commit (or sweep)
        # The commits of a busy moment share one chaining pass (`CHAIN_DEBOUNCE`).
        db.after_audit_commit(lambda: ctx.tasks.spawn_coalesced("audit-chain", chain, delay=CHAIN_DEBOUNCE))
    core = Core(ctx, wake=wake if role == Role.FRONT else None)
    return App(settings=settings, ctx=ctx, core=core, sweeper=Sweeper(core, share), role=role, closers=closers)
