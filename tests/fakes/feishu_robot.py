"""A local Feishu group-robot webhook (real HTTP on 127.0.0.1) that verifies signatures as Feishu does.

Feishu's rule (custom bot guide, "signature verification"): the request carries `timestamp`
(unix seconds, as a string) and `sign`; the robot computes
`base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b""))` and rejects a mismatch, or a
timestamp more than an hour away, with code 19021. The computation is written out here on
purpose, independently of the code under test. Accepted messages are kept in `messages`;
every request body in `requests`. With `hang` set, the robot reads a request and never answers
(`hung` is set when that happens).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

HOOK_PATH = "/open-apis/bot/v2/hook/0f1e2d3c-test"
SIGN_FAILED = {"code": 19021, "data": {}, "msg": "sign match fail or timestamp is not within one hour from current time"}


@dataclass
class FakeFeishuRobot:
    """Use as an async context manager; `url` is the value for FEISHU_WEBHOOK_URL."""

    secret: str | None = "robot-secret"
    requests: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    hang: bool = False
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}"

    def _signature_ok(self, body: dict[str, Any]) -> bool:
        timestamp, sign = body.get("timestamp"), body.get("sign")
        if not isinstance(timestamp, str) or not timestamp.isdigit() or not isinstance(sign, str):
            return False
        if abs(time.time() - int(timestamp)) > 3600:
            return False
        string_to_sign = f"{timestamp}\n{self.secret}"
        expected = base64.b64encode(hmac.new(string_to_sign.encode("utf-8"), digestmod=hashlib.sha256).digest()).decode()
        return hmac.compare_digest(expected, sign)

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.hang:
            self.hung.set()
            await self._release.wait()
        if self.secret is not None and not self._signature_ok(body):
            return web.json_response(SIGN_FAILED)
        if body.get("msg_type") != "text" or not isinstance(body.get("content", {}).get("text"), str):
            return web.json_response({"code": 9499, "data": {}, "msg": "Bad Request"})
        self.messages.append(body["content"]["text"])
        return web.json_response({"code": 0, "data": {}, "msg": "success"})

    async def __aenter__(self) -> FakeFeishuRobot:
        app = web.Application()
        app.router.add_post(HOOK_PATH, self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._release.set()
        await self._runner.cleanup()
