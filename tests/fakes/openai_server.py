"""A scripted OpenAI-compatible Chat Completions server (real HTTP on 127.0.0.1).

The bot's real `openai` client talks to it through `OPENAI_BASE_URL`. A test scripts it either
with a queue of replies (`reply`, `call`, `fail`) or with a `responder(request) -> Reply` function
that decides from the conversation, which is how concurrent conversations are scripted.
Every request body is recorded in `requests`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Reply:
    """One scripted answer: text, tool calls (name, arguments as dict or raw string), or an HTTP failure."""

    content: str | None = None
    calls: tuple[tuple[str, Any], ...] = ()
    status: int = 200
    retry_after: float | None = None
    delay: float = 0.0
    raw_body: str | None = None
    until: asyncio.Event | None = None  # answer only once the test sets this event (a hung model, then a late answer)
    drop: bool = False  # close the connection without an answer (a crashed or restarted endpoint)


def text(content: str, delay: float = 0.0, until: asyncio.Event | None = None) -> Reply:
    return Reply(content=content, delay=delay, until=until)


def calls(*pairs: tuple[str, Any], content: str | None = None, delay: float = 0.0, until: asyncio.Event | None = None) -> Reply:
    return Reply(content=content, calls=tuple(pairs), delay=delay, until=until)


def failure(status: int, retry_after: float | None = None, delay: float = 0.0) -> Reply:
    return Reply(status=status, retry_after=retry_after, delay=delay)


def raw(body: str) -> Reply:
    """A 200 answer with exactly this body (a broken or merely unusual OpenAI-compatible server)."""
    return Reply(raw_body=body)


def dropped() -> Reply:
    """The connection is closed once the request has arrived, with no answer at all."""
    return Reply(drop=True)


@dataclass
class ScriptedModel:
    """The fake model server. Use as an async context manager (tests get it from a fixture)."""

    responder: Callable[[dict[str, Any]], Reply] | None = None
    queue: deque[Reply] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    async def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the server has received `count` requests in all."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)

    def last_messages(self) -> list[dict[str, Any]]:
        return self.requests[-1]["messages"] if self.requests else []

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        async with self._arrived:
            self._arrived.notify_all()
        if self.responder is not None:
            reply = self.responder(body)
        elif self.queue:
            reply = self.queue.popleft()
        else:
            reply = text("(script exhausted)")
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.until is not None:
            await reply.until.wait()
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPInternalServerError  # never sent: the connection is gone
        if reply.status != 200:
            headers = {"retry-after": str(reply.retry_after)} if reply.retry_after is not None else {}
            error = {"error": {"message": f"scripted failure {reply.status}", "type": "server_error"}}
            return web.json_response(error, status=reply.status, headers=headers)
        if reply.raw_body is not None:
            return web.Response(text=reply.raw_body, content_type="application/json")
        n = next(self._ids)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                    },
                }
                for i, (name, args) in enumerate(reply.calls)
            ]
        return web.json_response(
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": body.get("model", "scripted"),
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if reply.calls else "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )

    async def __aenter__(self) -> ScriptedModel:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def last_user_text(body: dict[str, Any]) -> str:
    """The newest user message of a request (what scripted responders branch on)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            return str(message.get("content"))
    return ""


def tool_results(body: dict[str, Any]) -> list[str]:
    """The tool results that follow the newest assistant tool-call message."""
    out: list[str] = []
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "tool":
            out.append(str(message.get("content")))
        else:
            break
    return list(reversed(out))
