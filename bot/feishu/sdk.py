"""Every use of lark-oapi's private internals, in one place (lark-oapi 1.7.x).

The long connection and the token refresh need what the SDK does not expose publicly:

- `lark_oapi.ws.client.Client._handle_data_frame(frame)`: overridden, because the SDK drops `card`
  frames without an ack; ours reuses `_combine(message_id, sum, seq, payload)` to reassemble
  fragmented frames and `_write_message(bytes)` to answer;
- `Client._conn` (the websocket, None when down) and `Client._auto_reconnect` (turned off to stop);
- `lark_oapi.ws.client.loop`: the module-global event loop every method uses;
- `lark_oapi.core.token.manager.TokenManager.cache`: the process-wide token cache, where a
  token Feishu rejected is dropped (`set(key, "", 0)`).

Memory: `import lark_oapi` runs the package's `__init__`, which imports every generated service
(about 146 MB and seconds of CPU), and `lark_oapi.ws.client` imports the event dispatcher, which
imports every service's event models. `load` imports only what it is asked for: the packages
`lark_oapi`, `lark_oapi.api` and `lark_oapi.event` are registered without running their
`__init__`, and `lark_oapi.event.dispatcher_handler` is replaced by a stand-in (the long
connection hands frames to `_handle_data_frame`, overridden below, never to a dispatcher).
`ApiClient` is the part of `lark_oapi.Client` we use (`im`, `contact`, `request`), built from the
same `Config` the SDK's builder fills. A Feishu process so stays at about 130 MB instead of 250.

`tests/test_feishu_sdk.py` checks each of these against the installed SDK and fails loudly when a
new version changes them; `pyproject.toml` pins lark-oapi to `>=1.7.5,<1.8`.

Importing a lark-oapi module also installs the SDK's own stdout handler on its `Lark` logger
(`[Lark] ...` lines in another format); `load` removes it, so those records go through the
process's handlers (redacted, and JSON when `CHATOPS_LOG_FORMAT=json`).
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import importlib.util
import json
import logging
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

log = logging.getLogger("chatops.feishu")

T = TypeVar("T")
FrameHandler = Callable[[bytes], dict[str, Any] | None]
SDK_LOGGER = "Lark"
TOKEN_CACHE_KEY = "self_tenant_token:{app_id}"


_LIGHT_PACKAGES = ("lark_oapi", "lark_oapi.api", "lark_oapi.event")
_DISPATCHER = "lark_oapi.event.dispatcher_handler"


class _NoDispatcher:
    """Stands in for `EventDispatcherHandler` (the long connection's frames never reach it)."""


def _light_packages() -> None:
    """Register lark-oapi's heavy package modules without running their `__init__` (see above).
    Nothing to do when the whole SDK was imported already."""
    if "lark_oapi" in sys.modules:
        return
    spec = importlib.util.find_spec("lark_oapi")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lark_oapi")
    root = next(iter(spec.submodule_search_locations))
    for name in _LIGHT_PACKAGES:
        package = ModuleType(name)
        package.__path__ = [root + name.removeprefix("lark_oapi").replace(".", "/")]
        package.__package__ = name
        sys.modules[name] = package
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, package)
    dispatcher = ModuleType(_DISPATCHER)
    dispatcher.EventDispatcherHandler = _NoDispatcher  # type: ignore[attr-defined]  # a module made here, at run time
    sys.modules[_DISPATCHER] = dispatcher


def load(name: str) -> ModuleType:
    """Import a lark-oapi module (slow: call it off the event loop) and route the SDK's logs.
    Only `name` and what it imports are loaded, never the whole SDK."""
    _light_packages()
    module = importlib.import_module(name)
    sdk_logger = logging.getLogger(SDK_LOGGER)
    for handler in list(sdk_logger.handlers):
        sdk_logger.removeHandler(handler)
    sdk_logger.propagate = True
    return module


async def in_daemon_thread(function: Callable[[], T]) -> T:
    """Run `function` (an SDK import: seconds of CPU) in a daemon thread. Unlike `asyncio.to_thread`,
    a process asked to stop meanwhile does not wait for it to finish before exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def fail(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(fail, exc)
        else:
            loop.call_soon_threadsafe(succeed, result)

    threading.Thread(target=run, name="lark-oapi-import", daemon=True).start()
    return await future


def ws_client_class(ws: ModuleType) -> type:
    """A `lark_oapi.ws.client.Client` whose data frames (event *and* card) go to `self.handler`."""

    class _Client(ws.Client):  # type: ignore[misc, name-defined]  # a class of a module imported at run time
        handler: FrameHandler

        async def _handle_data_frame(self, frame: Any) -> None:
            headers = {h.key: h.value for h in frame.headers}
            payload = frame.payload
            if int(headers.get("sum", "1")) > 1:
                payload = self._combine(headers["message_id"], int(headers["sum"]), int(headers["seq"]), payload)
                if payload is None:
                    return
            if headers.get("type") not in ("event", "card"):
                return
            started = time.monotonic()
            response: dict[str, Any] = {"code": 200}
            try:
                result = self.handler(payload)
                if result is not None:
                    response["data"] = base64.b64encode(json.dumps(result, ensure_ascii=False).encode()).decode()
            except Exception as exc:  # noqa: BLE001 - an error ack makes Feishu redeliver
                log.warning("feishu long connection: handler failed (%s)", type(exc).__name__)
                response = {"code": 500}
            rt = frame.headers.add()
            rt.key, rt.value = "biz_rt", str(int((time.monotonic() - started) * 1000))
            frame.payload = json.dumps(response).encode()
            await self._write_message(frame.SerializeToString())

    return _Client


def websocket_of(client: Any) -> Any:
    """The client's open websocket, or None when it is down."""
    return getattr(client, "_conn", None)


def forget_websocket(client: Any) -> None:
    client._conn = None


def stop_reconnecting(client: Any) -> None:
    client._auto_reconnect = False


def set_module_loop(ws: Any, loop: Any) -> None:
    """The SDK's import-time global loop, replaced by the connection thread's own."""
    ws.loop = loop


def forget_tenant_token(app_id: str) -> None:
    """Drop the cached tenant token of `app_id` (Feishu said it is invalid)."""
    manager = load("lark_oapi.core.token.manager").TokenManager
    manager.cache.set(TOKEN_CACHE_KEY.format(app_id=app_id), "", 0)


def _check_domain(domain: str) -> None:
    """The SDK builder's check (`lark_oapi.client._validate_domain`): the app secret goes only to an
    https origin, or plain http on loopback (tests)."""
    parsed = urllib.parse.urlsplit(domain)
    loopback = parsed.scheme == "http" and (parsed.hostname or "").lower() in ("127.0.0.1", "localhost", "::1")
    if not (parsed.scheme == "https" or loopback) or not parsed.netloc or "@" in parsed.netloc:
        raise ValueError(f"the Feishu domain must be an https origin (got {domain!r})")
    if parsed.path or parsed.query or parsed.fragment:
        raise ValueError(f"the Feishu domain must be an origin without a path (got {domain!r})")


class ApiClient:
    """The part of `lark_oapi.Client` the adapter uses: `im`, `contact`, `cardkit` and `request`, built like
    `lark_oapi.Client.builder()...build()` but without loading the other services."""

    def __init__(self, app_id: str, app_secret: str, *, domain: str, timeout: float) -> None:
        _check_domain(domain)
        model, enum = load("lark_oapi.core.model"), load("lark_oapi.core.enum")
        config = model.Config()
        config.app_id, config.app_secret, config.domain, config.timeout = app_id, app_secret, domain, timeout
        config.log_level = enum.LogLevel.WARNING
        load("lark_oapi.core.log").logger.setLevel(int(config.log_level.value))
        self._config = config
        self.im = load("lark_oapi.api.im.service").ImService(config)
        self.contact = load("lark_oapi.api.contact.service").ContactService(config)
        self.cardkit = load("lark_oapi.api.cardkit.service").CardkitService(config)

    def request(self, request: Any) -> Any:
        """`lark_oapi.Client.request`: a raw call (token, transport, JSON answer) for APIs without a model."""
        model, token, http = load("lark_oapi.core.model"), load("lark_oapi.core.token"), load("lark_oapi.core.http")
        option = model.RequestOption()
        token.verify(self._config, request, option)
        raw = http.Transport.execute(self._config, request, option)
        response = model.BaseResponse()
        content_type = raw.headers.get("Content-Type")
        if content_type is not None and content_type.startswith("application/json"):
            response = load("lark_oapi.core.json").JSON.unmarshal(str(raw.content, "utf-8"), model.BaseResponse)
        elif 200 <= raw.status_code < 300:
            response.code = 0
        response.raw = raw
        return response
