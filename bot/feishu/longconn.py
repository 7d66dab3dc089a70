"""The long connection (`lark.ws.Client`) in its own thread with its own event loop.

Pitfalls of lark-oapi 1.7.5, checked in `lark_oapi/ws/client.py`, and what we do about them:

- The module takes an event loop at import time (`loop = asyncio.get_event_loop()`) and every
  method uses that global. Imported under our running aiohttp loop it would be the main loop,
  and `start()` would fail with "This event loop is already running". The thread creates a fresh
  loop and assigns it to `lark_oapi.ws.client.loop` before `start()`. Because that global is
  per process, only one long connection may run per process (`_ONE_PER_PROCESS`).
- `_handle_data_frame` drops frames of type `card` without an ack. `sdk.ws_client_class` overrides it to
  hand `event` and `card` frames alike to our handler, and answers both exactly as the SDK
  answers events (`{"code": 200, "data": base64(json)}`; code 500 if the handler raised, which
  makes Feishu redeliver).
- There is no `stop()`. `LongConnection.stop` turns auto-reconnect off, stops the thread's
  loop, then cancels the SDK's tasks and closes the socket on that loop.
- The endpoint lookup uses `requests.post` without a timeout; the thread is a daemon so a hung
  lookup cannot block shutdown beyond `stop(timeout)`.

The handler runs on the SDK loop and must return quickly: the adapter's handler only records
the event in the database (on the main loop) and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from bot.feishu import sdk

log = logging.getLogger("chatops.feishu")

STOP_TIMEOUT = 3.0
FrameHandler = sdk.FrameHandler
_ONE_PER_PROCESS = threading.Lock()


class LongConnection:
    """Runs the SDK's websocket client in a daemon thread; `handler` gets raw frame payloads."""

    def __init__(self, *, app_id: str, app_secret: str, domain: str, handler: FrameHandler) -> None:
        self.app_id = app_id
        self._secret = app_secret
        self.domain = domain.rstrip("/")
        self.handler = handler
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._stopping = False
        self._ready = threading.Event()

    @property
    def connected(self) -> bool:
        return self._client is not None and sdk.websocket_of(self._client) is not None

    async def start(self) -> None:
        """Import the SDK (slow; off the loop) and start the connection thread."""
        if not _ONE_PER_PROCESS.acquire(blocking=False):
            raise RuntimeError("only one Feishu long connection can run per process")
        try:
            await sdk.in_daemon_thread(lambda: sdk.load("lark_oapi.ws.client"))
        except BaseException:
            _ONE_PER_PROCESS.release()
            raise
        self._thread = threading.Thread(target=self._run, name="feishu-long-connection", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 10)

    async def wait_connected(self) -> None:
        """Wait until the websocket is up (wrap in `asyncio.timeout`); raises if the thread died."""
        while not self.connected:
            if self._thread is None or not self._thread.is_alive():
                raise ConnectionError("the Feishu long connection is not running")
            await asyncio.sleep(0.02)

    def _run(self) -> None:
        ws = sdk.load("lark_oapi.ws.client")
        log_level = sdk.load("lark_oapi.core.enum").LogLevel.WARNING
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        sdk.set_module_loop(ws, loop)  # the SDK's import-time loop (see module docstring)
        self._loop = loop
        try:
            client = sdk.ws_client_class(ws)(
                self.app_id, self._secret, log_level=log_level, domain=self.domain, auto_reconnect=True
            )
            client.handler = self.handler
            self._client = client
            self._ready.set()
            client.start()
        except RuntimeError:
            if not self._stopping:
                log.exception("feishu long connection stopped unexpectedly")
        except Exception as exc:  # noqa: BLE001 - e.g. bad credentials; reported once, in one line
            log.error("feishu long connection failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._ready.set()
            self._shutdown(loop)
            _ONE_PER_PROCESS.release()

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                _complete(loop, asyncio.gather(*tasks, return_exceptions=True))
            websocket = sdk.websocket_of(self._client) if self._client is not None else None
            if websocket is not None:
                with contextlib.suppress(Exception):  # closing a dead socket
                    _complete(loop, asyncio.wait_for(websocket.close(), 2))
                sdk.forget_websocket(self._client)
        except Exception as exc:  # noqa: BLE001 - the thread ends either way; one line, no traceback
            log.warning("feishu long connection: shutting down: %s", type(exc).__name__)
        finally:
            loop.close()

    async def stop(self) -> None:
        """Stop the connection and wait (at most `STOP_TIMEOUT`) for the thread to finish."""
        self._stopping = True
        if self._client is not None:
            sdk.stop_reconnecting(self._client)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)
            if self._thread.is_alive():
                log.warning("the Feishu long connection thread did not stop within %.0fs", STOP_TIMEOUT)


def _complete(loop: asyncio.AbstractEventLoop, awaitable: Any) -> None:
    """Run `awaitable` to its end on the connection's own loop, even when `stop()` (from the bot's
    loop) asks that loop to stop meanwhile: `run_until_complete` then returns early with a
    RuntimeError, and the work is resumed."""
    future = asyncio.ensure_future(awaitable, loop=loop)
    for _ in range(5):  # each early return needs one more stop() landing: a few at most
        with contextlib.suppress(RuntimeError):
            loop.run_until_complete(future)
        if future.done():
            future.result()
            return
    future.cancel()
