"""Slack ack and `/healthz` latency while another process holds the SQLite write lock.

Signed `app_mention` events are POSTed one after another to the running bot's `/slack/events`,
first with the database free, then while a separate Python process holds `BEGIN IMMEDIATE` on the
same file (as `sqlite3` or a long `chatops audit export` might). Refused events (5xx) are delivered
again after the lock is released, as Slack does, and every conversation must then be answered once.
Run: `.venv/bin/python benchmarks/bench_lock.py [--events 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.app import build_app
from bot.slack import SlackAdapter
from tests.conftest import PRODUCT_DEFAULTS, make_settings
from tests.fakes.openai_server import ScriptedModel, text
from tests.fakes.slack_api import FakeSlackApi
from tests.fault_helpers import LockHolder
from tests.slack_helpers import encode, mention, signed, slack_env


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def line(name: str, values: list[float]) -> str:
    return f"  {name}: p50 {pct(values, 50):.0f} ms, p99 {pct(values, 99):.0f} ms, max {max(values):.0f} ms"


async def post(http: aiohttp.ClientSession, url: str, payload: dict, retry: bool = False) -> tuple[int, float]:
    body, content_type = encode(payload)
    headers = {"Content-Type": content_type, **signed(body)}
    if retry:
        headers.update({"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_error"})
    started = time.perf_counter()
    async with http.post(url, data=body.encode(), headers=headers) as response:
        await response.read()
        return response.status, (time.perf_counter() - started) * 1000


async def healthz(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with http.get(url) as response:
        await response.read()
        assert response.status == 200
    return (time.perf_counter() - started) * 1000


async def run(path: Path, events: int) -> None:
    async with FakeSlackApi() as slack, ScriptedModel() as model:
        model.responder = lambda body: text("done")
        settings = make_settings(model.url, f"sqlite:///{path}", **slack_env(slack), **PRODUCT_DEFAULTS)
        app = await build_app(settings)
        app.add_adapter(SlackAdapter(app.core, settings))
        await app.start(serve_http=True)
        base = f"http://127.0.0.1:{app.port}"
        holder = LockHolder(str(path))
        try:
            async with aiohttp.ClientSession() as http:
                free = [(await post(http, f"{base}/slack/events", mention(f"free {i}")))[1] for i in range(events)]
                await slack.wait_for("chat.postMessage", count=events, timeout=120)
                await holder.hold()
                held_at = time.perf_counter()
                locked, refused, health = [], [], []
                for i in range(events):
                    payload = mention(f"locked {i}")
                    status, took = await post(http, f"{base}/slack/events", payload)
                    locked.append(took)
                    health.append(await healthz(http, f"{base}/healthz"))
                    if status >= 500:
                        refused.append(payload)
                held_for = time.perf_counter() - held_at
                await holder.release()
                again = [await post(http, f"{base}/slack/events", p, retry=True) for p in refused]
                assert all(status == 200 for status, _ in again), again
                await slack.wait_for("chat.postMessage", count=2 * events, timeout=120)
        finally:
            holder.kill()
            await app.stop()
    print(f"{events} signed events one after another, SQLite, model answers at once")
    print(line("ack, database free", free))
    print(line(f"ack while another process holds the write lock ({held_for:.1f}s held)", locked))
    print(f"    refused with 5xx: {len(refused)} of {events}; after the release, redelivered and answered once each")
    print(line("/healthz while the lock is held", health))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        await run(Path(tmp) / "bench.db", args.events)


if __name__ == "__main__":
    asyncio.run(main())
