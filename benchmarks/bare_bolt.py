"""The floor `bench_serve.py` compares against: a bare slack-bolt `AsyncApp` that acks every
`app_mention` and posts one reply in its thread (`chat.postMessage`), nothing else.

It is served the way `chatops serve` serves Slack (aiohttp, `POST /slack/events`), talks to the same
fake Slack, and runs as its own process like the bot does.
Run by the benchmark: `python benchmarks/bare_bolt.py PORT SLACK_API_URL SIGNING_SECRET TOKEN REPLY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient


def build(api_url: str, signing_secret: str, token: str, reply: str) -> AsyncApp:
    client = AsyncWebClient(token=token, base_url=api_url)
    app = AsyncApp(client=client, signing_secret=signing_secret)

    @app.event("app_mention")
    async def answer(event: dict[str, Any], client: AsyncWebClient) -> None:
        await client.chat_postMessage(channel=event["channel"], thread_ts=event.get("thread_ts") or event["ts"], text=reply)

    return app


async def main(port: int, api_url: str, signing_secret: str, token: str, reply: str) -> None:
    bolt = build(api_url, signing_secret, token, reply)

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    http = web.Application()
    http.router.add_post("/slack/events", events)
    http.router.add_get("/healthz", healthz)
    runner = web.AppRunner(http, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, api_url, secret, token, reply = sys.argv[1:6]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(port), api_url, secret, token, reply))
