"""lark-oapi's private internals that `bot/feishu/sdk.py` relies on, checked against the installed SDK.

When one of these fails after an upgrade, read `bot/feishu/sdk.py` and the SDK's new source before
widening the pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import subprocess
import sys
import time

from bot.feishu import sdk


def params(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_ws_client_internals_are_what_we_override_and_call():
    ws = sdk.load("lark_oapi.ws.client")
    client = ws.Client
    assert inspect.iscoroutinefunction(client._handle_data_frame), "lark-oapi changed Client._handle_data_frame"
    assert params(client._handle_data_frame) == ["self", "frame"], "lark-oapi changed Client._handle_data_frame"
    assert params(client._combine) == ["self", "msg_id", "sum_", "seq", "bs"], "lark-oapi changed Client._combine"
    assert inspect.iscoroutinefunction(client._write_message) and params(client._write_message) == ["self", "data"]
    assert isinstance(ws.loop, asyncio.AbstractEventLoop), "lark-oapi no longer keeps a module-global loop"
    instance = sdk.ws_client_class(ws)("cli_x", "secret", domain="http://127.0.0.1:9", auto_reconnect=True)
    assert sdk.websocket_of(instance) is None and "_conn" in vars(instance), "lark-oapi renamed Client._conn"
    assert instance._auto_reconnect is True, "lark-oapi renamed Client._auto_reconnect"
    sdk.stop_reconnecting(instance)
    assert instance._auto_reconnect is False


def test_the_token_cache_is_where_we_drop_tokens():
    manager = sdk.load("lark_oapi.core.token.manager").TokenManager
    key = sdk.TOKEN_CACHE_KEY.format(app_id="cli_probe")
    manager.cache.set(key, "t-probe", int(time.time()) + 3600)  # expiry is an absolute time
    assert manager.cache.get(key) == "t-probe", "lark-oapi changed TokenManager.cache or its key"
    sdk.forget_tenant_token("cli_probe")
    assert not manager.cache.get(key)
    source = inspect.getsource(sdk.load("lark_oapi.core.token.manager"))
    assert 'f"self_tenant_token:{config.app_id}"' in source, "lark-oapi changed the tenant token cache key"


def test_the_sdk_prints_nothing_itself_after_load():
    sdk.load("lark_oapi.ws.client")
    lark_logger = logging.getLogger(sdk.SDK_LOGGER)
    assert lark_logger.handlers == [] and lark_logger.propagate


def test_only_the_services_used_are_imported():
    """`import lark_oapi` would load every generated service (~146 MB); a Feishu process loads im, contact, cardkit and ws."""
    probe = (
        "import sys\n"
        "from bot.feishu import sdk\n"
        "from bot.feishu.client import FeishuApi\n"
        "client = FeishuApi(app_id='cli_x', app_secret='secret', domain='http://127.0.0.1:9')\n"
        "client._build()\n"
        "sdk.load('lark_oapi.ws.client')\n"
        "assert client._client.im.v1.message.reply and client._client.contact.v3.user.get\n"
        "loaded = {m.split('.')[2] for m in sys.modules if m.startswith('lark_oapi.api.')}\n"
        "print(sorted(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "['cardkit', 'contact', 'im']", done.stdout + done.stderr
