"""One MCP server's connection, owned by one long-lived task that connects, waits, and reconnects.

The task enters the transport (a stdio child process or a streamable HTTP client) and the SDK
`Client`, lists the tools, publishes the client, then waits until the connection is lost (the
read stream ends, a call saw the connection close, or the transport failed) or the manager
closes it; it always leaves the SDK's context managers in the task that entered them. While it
waits, a `notifications/tools/list_changed` from the server makes it list the tools again
(`listing.py`), within `connect_timeout`; a failure is logged and the tools stay stale.
A stdio server's stderr is read through a pipe: logged at DEBUG, its last line explains a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TextIO

import anyio
import httpx2
import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tools.mcp.config import ServerConfig, shown_url
from tools.mcp.listing import ToolBook, announces_changes, list_all, listen_for_changes, relist

log = logging.getLogger("chatops.mcp")

CLIENT_INFO = mcp_types.Implementation(name="chatops-agent", version="0.1.0")
CLOSE_TIMEOUT = 10.0


class _WatchedStream:
    """A read stream that sets `lost` when it ends; otherwise a transparent proxy of the transport's."""

    def __init__(self, inner: Any, lost: asyncio.Event) -> None:
        self._inner, self._lost = inner, lost

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._lost.set()
            raise

    def __aiter__(self) -> _WatchedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def call_key(tool: str, arguments: Any) -> str:
    """How a `tools/call` is recognised in the transport: the tool's name and its canonical arguments."""
    return json.dumps([tool, arguments], sort_keys=True, ensure_ascii=False)


class UnsentCalls(httpx2.AsyncHTTPTransport):
    """An HTTP transport that notes each `tools/call` whose POST failed while connecting: it was never sent.

    The SDK turns any transport failure into a closed connection; this is how a caller can still
    tell "the call never left" (not sent) from "the call was sent and the answer lost" (in doubt).
    """

    def __init__(self, unsent: list[str], **options: Any) -> None:
        super().__init__(**options)
        self._unsent = unsent

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            return await super().handle_async_request(request)
        except (httpx2.ConnectError, httpx2.ConnectTimeout):
            try:
                message = json.loads(request.content or b"null")
            except ValueError:
                message = None
            if isinstance(message, dict) and message.get("method") == "tools/call":
                params = message.get("params") or {}
                self._unsent.append(call_key(str(params.get("name")), params.get("arguments") or {}))
            raise


@asynccontextmanager
async def _transport(config: ServerConfig, errlog: TextIO | None, lost: asyncio.Event, unsent: list[str]) -> AsyncIterator[Any]:
    if config.url is not None:
        timeout = httpx2.Timeout(30.0, read=300.0)
        async with (
            httpx2.AsyncClient(headers=config.headers, timeout=timeout, transport=UnsentCalls(unsent)) as http,
            streamable_http_client(config.url, http_client=http) as (read, write),
        ):
            yield _WatchedStream(read, lost), write
        return
    assert config.command is not None and errlog is not None
    params = StdioServerParameters(command=config.command, args=config.args, env=config.env or None, cwd=config.cwd)
    async with stdio_client(params, errlog=errlog) as (read, write):
        yield _WatchedStream(read, lost), write


def leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _StderrTail:
    """A stdio server's stderr: each line logged at DEBUG, the last few kept to explain a failure."""

    def __init__(self, server: str) -> None:
        self._server = server
        read_fd, write_fd = os.pipe()
        self._reader = os.fdopen(read_fd, "rb")
        self.file = os.fdopen(write_fd, "w", encoding="utf-8", errors="replace")  # the child's stderr
        self.lines: deque[str] = deque(maxlen=10)
        self._pump: asyncio.Task[None] | None = None
        self._transport: asyncio.BaseTransport | None = None

    async def __aenter__(self) -> _StderrTail:
        stream = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), self._reader)
        self._pump = asyncio.create_task(self._read(stream), name=f"mcp-stderr:{self._server}")
        return self

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            if text := line.decode("utf-8", "replace").strip():
                self.lines.append(text)
                log.debug("MCP server %s: %s", self._server, text)

    async def __aexit__(self, *exc: object) -> None:
        self.file.close()  # with the child gone, the pipe ends and the pump drains what is left
        if self._pump is not None:
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
            self._pump.cancel()
        if self._transport is not None:
            self._transport.close()

    def last(self) -> str:
        return f" (stderr: {self.lines[-1][:300]})" if self.lines else ""


class Connection:
    """The state of one server, and the task that keeps it connected."""

    def __init__(
        self,
        name: str,
        config: ServerConfig,
        *,
        connect_timeout: float,
        backoff_initial: float,
        backoff_max: float,
        jitter: Callable[[], float],
    ) -> None:
        self.name, self.config = name, config
        self.connect_timeout, self.backoff_initial, self.backoff_max = connect_timeout, backoff_initial, backoff_max
        self._jitter = jitter
        self.client: Client | None = None
        self.state = "new"  # connecting, up, down (reconnecting), failed (at start-up), closed
        self.problem: str | None = None
        self.connects = 0
        self.unsent: list[str] = []  # `call_key`s of calls that failed to connect (HTTP servers only)
        self.book = ToolBook(name)  # the tools as first listed, and which changed since
        self._lost = asyncio.Event()
        self._notice = asyncio.Event()  # a change notification came: list again
        self._closing = asyncio.Event()
        self._changed = asyncio.Condition()
        self._first: asyncio.Future[list[mcp_types.Tool] | None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[mcp_types.Tool] | None:
        """Connect once; the tools, or None (see `problem`). On success the task stays, reconnecting as needed."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"mcp:{self.name}")
        return await self._first

    def never_sent(self, tool: str, arguments: Any) -> bool:
        """True (once) when this call's HTTP request failed while connecting: the server never saw it."""
        key = call_key(tool, arguments)
        if key in self.unsent:
            self.unsent.remove(key)
            return True
        return False

    def lost(self) -> None:
        """A caller saw the connection close: reconnect now."""
        self._lost.set()

    async def wait_for(self, predicate: Callable[[Connection], bool]) -> None:
        """Wait until `predicate(self)` holds, e.g. `lambda c: c.state == "up"` (bound it with `asyncio.timeout`)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _set_state(self, state: str, problem: str | None = None) -> None:
        self.state, self.problem = state, problem
        async with self._changed:
            self._changed.notify_all()

    async def _supervise(self) -> None:
        failures = 0
        while not self._closing.is_set():
            self._lost = asyncio.Event()
            await self._set_state("connecting", self.problem)
            async with _StderrTail(self.name) as stderr:
                try:
                    await self._session(stderr.file)
                    problem = "the server exited" if self.config.command else "the connection was lost"
                except Exception as exc:  # noqa: BLE001 - any failure of a server is reported, then retried
                    problem = self.explain(leaf(exc))
            problem += stderr.last()
            if self._closing.is_set():
                break
            if self._first is not None and not self._first.done():
                await self._set_state("failed", problem)
                self._first.set_result(None)
                return
            failures = 0 if self.state == "up" else failures + 1  # "up": it was connected, then lost
            delay = self._delay(max(1, failures))
            log.warning("MCP server %s is down (%s); reconnecting in %.1fs", self.name, problem, delay)
            await self._set_state("down", problem)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        await self._set_state("closed")

    @property
    def changed(self) -> set[str]:
        """Tools listed differently (or no longer listed) since start-up: never called until restart."""
        return self.book.changed

    async def _session(self, errlog: TextIO) -> None:
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.connect_timeout)
        with scope:
            transport = _transport(self.config, errlog, self._lost, self.unsent)
            async with Client(transport, cache=None, client_info=CLIENT_INFO, message_handler=self._on_message) as client:
                notices = self.book.notices
                tools = await list_all(client)
                scope.deadline = math.inf  # connected: the start-up deadline no longer applies
                self.book.compare(tools, notices)
                self.client, self.connects = client, self.connects + 1
                await self._set_state("up")
                if self._first is not None and not self._first.done():
                    self._first.set_result(tools)
                try:
                    await self._watch(client)
                finally:
                    self.client = None
        if scope.cancelled_caught:
            raise TimeoutError(f"no answer within {self.connect_timeout:g}s")

    async def _on_message(self, message: Any) -> None:
        """The SDK's `message_handler`: it must not block (it runs in the session's read loop)."""
        if isinstance(message, mcp_types.ToolListChangedNotification):
            log.debug("MCP server %s says its tools changed; listing them again", self.name)
            self._noticed()

    def _noticed(self) -> None:
        self.book.notice()
        self._notice.set()

    async def _watch(self, client: Client) -> None:
        """Until the connection is lost: list again after each change notification (and keep a stream of
        them open where the protocol asks for one)."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._relist_on_notice, client)
            if announces_changes(client):
                tasks.start_soon(self._listen, client)
            await self._lost.wait()
            tasks.cancel_scope.cancel()

    async def _listen(self, client: Client) -> None:
        await listen_for_changes(client, self.name, opened=self._noticed, closed=self.lost, delay=self._delay)

    async def _relist_on_notice(self, client: Client) -> None:
        while True:
            await self._notice.wait()
            self._notice.clear()
            try:
                await self.relist(self.connect_timeout, client)
            except Exception as exc:  # noqa: BLE001 - logged, never raised: the connection stays up
                log.warning(
                    "MCP server %s: listing its tools again failed (%s); each call lists them again first",
                    self.name, self.explain(leaf(exc)),
                )  # fmt: skip

    async def relist(self, within: float, client: Client | None = None) -> None:
        """List the tools again within `within` seconds and compare them with start-up (`book`). Raises when the
        server is down or the listing fails (a closed connection is also reported as lost)."""
        client = client or self.client
        if client is None:
            raise MCPError(mcp_types.CONNECTION_CLOSED, "the server is down")
        try:
            await relist(client, self.book, within)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED and client is self.client:
                self.lost()  # (an older session's client says nothing about the current one)
            raise
        async with self._changed:
            self._changed.notify_all()

    def _delay(self, failures: int) -> float:
        """The backoff before attempt `failures` + 1 (0: the first delay, without jitter)."""
        if failures == 0:
            return self.backoff_initial
        return min(self.backoff_max, self.backoff_initial * 2.0 ** max(0, failures - 1)) * (0.5 + self._jitter() / 2)

    def explain(self, exc: BaseException) -> str:
        """A failure of this server in words, without its URL's credentials."""
        if isinstance(exc, MCPError):
            if exc.code == mcp_types.CONNECTION_CLOSED:
                return "the server closed the connection"
            return f"{exc.message} (MCP error {exc.code})"
        if isinstance(exc, TimeoutError):
            return str(exc) or "timed out"
        if isinstance(exc, FileNotFoundError) and self.config.command:
            return f"cannot start {self.config.command!r}: command not found"
        if isinstance(exc, httpx2.HTTPError):
            url, shown = self.config.url or "", shown_url(self.config.url or "")
            return f"cannot reach {shown} ({type(exc).__name__}: {str(exc).replace(url, shown)})"
        return f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        self._closing.set()
        self._lost.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT)
        except TimeoutError:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
