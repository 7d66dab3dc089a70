"""Core benchmarks: ack latency, 200 concurrent conversations with a slow model, and the bot's own
time per turn: a turn's wall time less the time its model calls took, as the bot itself measures them
(`chatops_model_seconds`, the SDK's client work included), with a second estimate beside it.
Run: `.venv/bin/python benchmarks/bench_core.py [--db sqlite|postgres] [--conversations 200]`.

Everything runs on 127.0.0.1: the scripted OpenAI-compatible server from the tests plays the model.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.app import App, build_app
from bot.core.events import IncomingMessage, Thread, User
from bot.lifecycle import loop_factory
from tests.conftest import PRODUCT_DEFAULTS, make_settings
from tests.fakes.openai_server import ScriptedModel, calls, text
from tests.support_tools import Ledger, RecordingChannel, notes_toolset


class AnswerQueue(RecordingChannel):
    """Hands each posted answer to the benchmark as it arrives."""

    def __init__(self, platform: str) -> None:
        super().__init__(platform)
        self.answers: asyncio.Queue[str] = asyncio.Queue()

    async def post_reply(self, thread: Thread, text: str) -> None:
        await super().post_reply(thread, text)
        self.answers.put_nowait(text)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def count_sql(engine: sa.Engine) -> dict[str, int]:
    """Statements and commits on `engine` from now on (noise-free, unlike timings)."""
    counts = {"statements": 0, "commits": 0}

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _statement(*_: object) -> None:
        counts["statements"] += 1

    @sa.event.listens_for(engine, "commit")
    def _commit(*_: object) -> None:
        counts["commits"] += 1

    return counts


def message(i: int, run: str) -> IncomingMessage:
    user = User("bench", f"U{i}", "T1", f"user{i}")
    return IncomingMessage(user, f"hello {i}", Thread("bench", {"i": i}), f"bench:{run}:{i}", (f"bench:{run}:{i}",))


async def concurrent_conversations(db_url: str, n: int, model_delay: float) -> None:
    async with ScriptedModel() as model:
        model.responder = lambda body: text("ok", delay=model_delay)
        app = await build_app(make_settings(model.url, db_url, **PRODUCT_DEFAULTS))
        app.ctx.channels["bench"] = RecordingChannel("bench")
        await app.start(serve_http=False)
        try:
            run = uuid.uuid4().hex[:6]
            acks: list[float] = []

            async def deliver(i: int) -> None:
                started = time.perf_counter()
                await app.core.accept_message(message(i, run))
                acks.append((time.perf_counter() - started) * 1000)

            started = time.perf_counter()
            await asyncio.gather(*(deliver(i) for i in range(n)))
            await app.ctx.tasks.idle()
            wall = time.perf_counter() - started
        finally:
            await app.stop()
    print(
        f"{n} conversations at once, model latency {model_delay:.1f}s: all answered in {wall:.2f}s "
        f"({len(model.requests)} model calls)"
    )
    print(
        f"  accept (record + dedupe + audit, the work before an ack): p50 {pct(acks, 50):.1f} ms, "
        f"p99 {pct(acks, 99):.1f} ms, max {max(acks):.1f} ms"
    )


def model_seconds() -> float:
    """The bot's own measure of its model calls so far (`chatops_model_seconds`: each call, SDK included)."""
    return REGISTRY.get_sample_value("chatops_model_seconds_sum") or 0.0


@dataclass
class Turns:
    totals: list[float] = field(default_factory=list)  # ms from the message to its posted answer
    in_model: list[float] = field(default_factory=list)  # ms of those the bot spent in model calls
    cpu: float = 0.0  # process CPU seconds of the turns (the in-process fake model's included)


async def serial_turns(app: App, channel: AnswerQueue, model: ScriptedModel, turns: int) -> Turns:
    measured, run = Turns(), uuid.uuid4().hex[:6]
    for i in range(turns):
        before, in_model = len(model.requests), model_seconds()
        cpu_started = time.process_time()
        started = time.perf_counter()
        await app.core.accept_message(message(i, run))
        await channel.answers.get()  # the turn ends when its answer is posted
        measured.totals.append((time.perf_counter() - started) * 1000)
        measured.cpu += time.process_time() - cpu_started
        measured.in_model.append((model_seconds() - in_model) * 1000)
        await app.ctx.tasks.idle()  # let the audit chainer finish outside the measurement
        assert len(model.requests) == before + 2
    return measured


async def replayed_model_calls(app: App, bodies: list[dict], turns: int) -> tuple[float, float]:
    """Median wall ms and mean CPU ms of a turn's model calls made again alone (the same bodies, client
    and server), without the redaction `complete()` does first: that part is the bot's own."""
    wall, cpu = [], time.process_time()
    for _ in range(turns):
        started = time.perf_counter()
        for body in bodies:
            await app.ctx.model.complete(body["messages"], body.get("tools", []), model=body["model"])
        wall.append((time.perf_counter() - started) * 1000)
    cpu = time.process_time() - cpu
    redacting, redact_cpu = [], time.process_time()
    for _ in range(turns):
        started = time.perf_counter()
        for body in bodies:
            app.ctx.redactor.redact(body["messages"])
        redacting.append((time.perf_counter() - started) * 1000)
    cpu -= time.process_time() - redact_cpu
    return statistics.median(wall) - statistics.median(redacting), cpu / turns * 1000


async def overhead_per_turn(db_url: str, turns: int) -> None:
    """Serial turns with an instant model and one read tool call: wall time minus model time = the bot's own time."""
    ledger = Ledger()
    async with ScriptedModel() as model:
        model.responder = lambda body: (
            text("done") if body["messages"][-1]["role"] == "tool" else calls(("count_notes", {"topic": "x"}))
        )
        app = await build_app(make_settings(model.url, db_url, **PRODUCT_DEFAULTS))
        for spec in notes_toolset(ledger).specs:
            app.ctx.registry.add(spec)
        channel = AnswerQueue("bench")
        app.ctx.channels["bench"] = channel
        await app.start(serve_http=False)
        gc.collect()
        gc.freeze()  # as `chatops serve` does once started (`bot.lifecycle.start`)
        counts = count_sql(app.ctx.db.sync_engine)
        try:
            measured = await serial_turns(app, channel, model, turns)
            sql = dict(counts)
            replay_ms, replay_cpu = await replayed_model_calls(app, model.requests[-2:], turns)
        finally:
            await app.stop()
    own = [total - in_model for total, in_model in zip(measured.totals, measured.in_model, strict=True)]
    print(
        f"bot's own time per turn (2 model calls + 1 read tool; the model calls' time, as chatops_model_seconds "
        f"measured it in the turn, subtracted), {turns} turns: median {statistics.median(own):.1f} ms, p90 {pct(own, 90):.1f} ms"
    )
    print(
        f"  the turn: median {statistics.median(measured.totals):.1f} ms, of which its model calls "
        f"{statistics.median(measured.in_model):.1f} ms"
    )
    replayed = [total - replay_ms for total in measured.totals]
    print(
        f"  with the same two model calls made again alone subtracted instead: median {statistics.median(replayed):.1f} ms; "
        f"CPU {measured.cpu / turns * 1000 - replay_cpu:.1f} ms per turn (a call costs less alone than inside a turn: "
        f"these two count the difference as the bot's own)"
    )
    print(
        f"  per turn, the audit chainer and outbox included: {sql['statements'] / turns:.1f} SQL statements, "
        f"{sql['commits'] / turns:.1f} commits (barely moved by the machine's load, unlike the times)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--model-delay", type=float, default=2.0)
    parser.add_argument("--turns", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.db == "sqlite":
            db_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        else:
            import sqlalchemy as sa

            schema = f"bench_{uuid.uuid4().hex[:8]}"
            engine = sa.create_engine(sa.make_url(args.postgres_url).set(drivername="postgresql+psycopg"))
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            db_url = f"{args.postgres_url}?options=-csearch_path%3D{schema}"
        print(f"database: {args.db}")
        try:
            await concurrent_conversations(db_url, args.conversations, args.model_delay)
            await overhead_per_turn(db_url, args.turns)
        finally:
            if args.db == "postgres":
                with engine.begin() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


if __name__ == "__main__":
    # On the event loop `chatops serve` runs on (CHATOPS_EVENT_LOOP's default: uvloop where installed).
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        runner.run(main())
