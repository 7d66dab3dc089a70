"""No start-up window: in Feishu webhook mode, a verified group @mention POSTed within the first
100 ms after the port opens is acknowledged 2xx within 3 s and answered."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp

from bot.feishu import FeishuAdapter
from tests.fakes.openai_server import text
from tests.feishu_helpers import FeishuBot, at_bot, fake_feishu, feishu_env

__all__ = ["fake_feishu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def port_opened(port: int, timeout: float = 60.0) -> float:
    """Connect as soon as the port accepts; returns the moment it did (perf_counter)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.002)  # the port is not open yet: try again at once
                continue
            opened = time.perf_counter()
            writer.close()
            return opened


async def test_a_group_mention_in_the_first_100_ms_after_the_port_opens_is_acked_and_answered(bots, fake_feishu, model):
    model.script(text("Answered right after start-up."))
    port = free_port()
    app = await bots.start(serve_http=True, CHATOPS_PORT=str(port), **feishu_env(fake_feishu))
    adapter = FeishuAdapter(app.core, app.settings)
    app.add_adapter(adapter)
    starting = asyncio.create_task(bots.run(app))
    async with aiohttp.ClientSession() as http:
        bot = FeishuBot(app, adapter, fake_feishu, http)
        opened = await port_opened(port)
        sent = time.perf_counter()
        status, _ = await bot.send(at_bot("are you up?"))
        acked = time.perf_counter()
        await starting
        assert sent - opened < 0.1
        assert 200 <= status < 300 and acked - sent < 3.0, (status, acked - sent)
        await fake_feishu.wait_for(lambda: "Answered right after start-up." in fake_feishu.texts(), timeout=60)
        await bot.settle()
        assert await bot.count("inbox_event") == 1
