"""Slack ack latency over real HTTP while the model is slow.

Signed `app_mention` events are POSTed to the running bot's `/slack/events` (Slack's real signing
algorithm) in waves; the model answers after `--model-delay` seconds. Reports the HTTP ack latency
(what Slack's 3-second rule measures) and how long until every conversation was answered in Slack.
Run: `.venv/bin/python benchmarks/bench_ack.py [--events 200] [--wave 50] [--db sqlite|postgres]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slack_sdk.signature import SignatureVerifier

from bot.app import build_app
from bot.slack import SlackAdapter
from tests.conftest import PRODUCT_DEFAULTS, make_settings
from tests.fakes.openai_server import ScriptedModel, text
from tests.fakes.slack_api import FakeSlackApi
from tests.slack_helpers import SIGNING_SECRET, mention, slack_env


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(db_url: str, events: int, wave: int, model_delay: float) -> None:
    verifier = SignatureVerifier(SIGNING_SECRET)
    async with FakeSlackApi() as slack, ScriptedModel() as model:
        model.responder = lambda body: text("done", delay=model_delay)
        settings = make_settings(model.url, db_url, **slack_env(slack), **PRODUCT_DEFAULTS)
        app = await build_app(settings)
        app.add_adapter(SlackAdapter(app.core, settings))
        await app.start(serve_http=True)
        url = f"http://127.0.0.1:{app.port}/slack/events"
        latencies: list[float] = []
        try:
            async with aiohttp.ClientSession() as http:

                async def post(i: int) -> None:
                    body = json.dumps(mention(f"request {i}", channel=f"C{i % 20:04d}")).encode()
                    ts = str(int(time.time()))
                    headers = {
                        "X-Slack-Request-Timestamp": ts,
                        "Content-Type": "application/json",
                        "X-Slack-Signature": verifier.generate_signature(timestamp=ts, body=body),
                    }
                    started = time.perf_counter()
                    async with http.post(url, data=body, headers=headers) as response:
                        await response.read()
                        assert response.status == 200, response.status
                    latencies.append((time.perf_counter() - started) * 1000)

                started = time.perf_counter()
                for first in range(0, events, wave):
                    await asyncio.gather(*(post(i) for i in range(first, min(events, first + wave))))
                acked = time.perf_counter() - started
                await slack.wait_for("chat.postMessage", count=events, timeout=120)
                answered = time.perf_counter() - started
        finally:
            await app.stop()
    print(f"{events} signed events in waves of {wave}, model latency {model_delay:.1f}s")
    print(
        f"  HTTP ack latency: p50 {statistics.median(latencies):.1f} ms, p99 {pct(latencies, 99):.1f} ms, "
        f"max {max(latencies):.1f} ms (all acked after {acked:.2f}s)"
    )
    print(f"  every conversation answered in Slack after {answered:.2f}s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--wave", type=int, default=50)
    parser.add_argument("--model-delay", type=float, default=2.0)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.db == "sqlite":
            await run(f"sqlite:///{Path(tmp) / 'bench.db'}", args.events, args.wave, args.model_delay)
            return
        import sqlalchemy as sa

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        engine = sa.create_engine(sa.make_url(args.postgres_url).set(drivername="postgresql+psycopg"))
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            await run(f"{args.postgres_url}?options=-csearch_path%3D{schema}", args.events, args.wave, args.model_delay)
        finally:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


if __name__ == "__main__":
    asyncio.run(main())
