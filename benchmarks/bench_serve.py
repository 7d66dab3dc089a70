"""`chatops serve` against a bare slack-bolt app, side by side in one run; every figure as a ratio.

One command (`.venv/bin/python benchmarks/bench_serve.py [--quick]`) starts, in this process, the fake
Slack Web API, the scripted OpenAI-compatible model and the load generator (signed `app_mention`
events POSTed to `/slack/events`), and as real subprocesses: `benchmarks/bare_bolt.py` (acks, posts one
reply: the floor) and `chatops serve` (plus `--serve-args`, e.g. `--serve-args="--workers 2"`).
A chatops turn is 2 model calls + 1 read tool (`search_crm_leads`) with an instant model.

Phases (each reports the goal beside the figure):
1. steady load: N events from 4 and from 20 concurrent senders (each sends its next event when the
   previous one was acked): ack p50/p99 while agents run, and completed turns/s vs bare replies/s;
2. 200 conversations at once, a 2 s model (one call): every ack < 1 s, all answered within 6 s;
3. 1,000 at once (same model): every ack < 3 s;
4. memory: RSS of every `chatops serve` process after 3. (1,000+ idle conversations) and 1,000 pending
   approvals (a write tool per turn, left undecided); idle RSS with Slack only, and Slack + Feishu;
5. three replicas on one PostgreSQL (skipped when none answers at --postgres-url): turns/s with
   events spread over the three, and approvals whose click reaches all three at once: executions
   per approval counted from the database (`tool_executed` audit rows), which must be exactly one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slack_sdk.signature import SignatureVerifier  # noqa: E402

from tests.fakes.openai_server import Reply, ScriptedModel, calls, text  # noqa: E402
from tests.fakes.slack_api import FakeSlackApi  # noqa: E402
from tests.slack_helpers import BOT_TOKEN, SIGNING_SECRET, approval_id_of, click, mention  # noqa: E402

ANSWER = "bench-answer"
USERS = 40  # the people writing: each is looked up once (users.info), then cached, as in a real workspace
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


# ---------------------------------------------------------------------- figures
def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Report:
    """Lines of the final table: measurement, bare Bolt, chatops, ratio, goal, verdict."""

    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)

    def add(self, what: str, bare: str, chatops: str, ratio: str = "", goal: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("met" if ok else "NOT met")
        self.rows.append((what, bare, chatops, ratio, goal, verdict))
        print(f"  {what}: bare {bare} | chatops {chatops} | {ratio} | goal {goal} {verdict}", flush=True)

    def markdown(self) -> str:
        lines = ["| measurement | bare Bolt | chatops | ratio | goal | |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers of a `chatops serve`, when it has any)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                ppid = int(stat.read().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class Server:
    """A subprocess answering Slack events on `port`; `url` is its `/slack/events`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, port: int) -> None:
        self.name, self.argv, self.env, self.cwd, self.port = name, argv, env, cwd, port
        self.log = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slack/events"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)

    async def start(self, http: aiohttp.ClientSession, ready: str = "/healthz", within: float = 60) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}:\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{self.port}{ready}") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        await self.stop()
        raise RuntimeError(f"{self.name} not ready after {within}s; see {self.log}:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:]) if self.log.exists() else ""

    def rss(self) -> list[float]:
        return [rss_mb(pid) for pid in process_tree(self.proc.pid)] if self.proc else []

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


# ---------------------------------------------------------------------- the load
@contextlib.contextmanager
def harness_collector_paused() -> Iterator[None]:
    """This process's garbage is collected before a measurement, never during it. It plays the load
    generator, fake Slack and fake model, and keeps every call they saw: a full collection of its own
    took 120–200 ms, and one that fell inside a run added that to every ack in flight (measured: the
    first 13–20 acks of a 20-sender run at 135–200 ms each, while the bot answered each in under
    30 ms), whichever app was measured."""
    gc.collect()
    gc.freeze()  # what exists now is never walked again
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Refused(Exception):
    """The app answered 5xx: Slack delivers the event again."""


class Load:
    """Signs and POSTs Slack payloads; counts the answers posted in the fake Slack."""

    def __init__(self, slack: FakeSlackApi, http: aiohttp.ClientSession) -> None:
        self.slack, self.http = slack, http
        self.verifier = SignatureVerifier(SIGNING_SECRET)
        self._seen = 0
        self.answers = 0
        self.cards: list[dict[str, Any]] = []
        self.run = uuid.uuid4().hex[:6]
        self._n = 0
        self.refused = 0  # deliveries answered 5xx (and sent again)

    def event(self) -> dict[str, Any]:
        """A new conversation (a thread of its own) from one of `USERS` people in one of 50 channels."""
        self._n += 1
        i = self._n
        user = f"U{self.run}{i % USERS:03d}".upper()
        return mention(f"request {i}", user=user, channel=f"C{i % 50:04d}", event_id=f"Ev{self.run}{i}")

    async def post(self, url: str, payload: dict[str, Any]) -> float:
        """POST one signed payload until it is acked, as Slack does: a refused delivery (5xx, e.g. the
        database busy) is counted in `refused` and sent again a second later. The successful ack's ms."""
        retry = 0
        while True:
            try:
                return await self._post_once(url, payload, retry)
            except Refused:
                self.refused += 1
                retry += 1
                await asyncio.sleep(1)

    async def _post_once(self, url: str, payload: dict[str, Any], retry: int) -> float:
        if payload.get("type") == "block_actions":
            body = ("payload=" + urllib.parse.quote(json.dumps(payload))).encode()
            content_type = "application/x-www-form-urlencoded"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        ts = str(int(time.time()))
        headers = {
            "X-Slack-Request-Timestamp": ts,
            "Content-Type": content_type,
            "X-Slack-Signature": self.verifier.generate_signature(timestamp=ts, body=body),
        }
        if retry:
            headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_error"})
        started = time.perf_counter()
        async with self.http.post(url, data=body, headers=headers) as response:
            await response.read()
            if response.status >= 500:
                raise Refused(response.status)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status} from {url}")
        return (time.perf_counter() - started) * 1000

    def _scan(self) -> None:
        calls = self.slack.calls
        for call in calls[self._seen :]:
            if call.status != 200 or call.method not in ("chat.postMessage", "chat.update"):
                continue
            if call.params.get("text") == ANSWER:  # posted, or written over the run's progress message
                self.answers += 1
            elif call.method == "chat.postMessage" and "Approval needed" in json.dumps(call.params.get("blocks") or ""):
                self.cards.append(call.params)
        self._seen = len(calls)

    async def wait_answers(self, count: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            self._scan()
            if self.answers >= count:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)

    async def wait_cards(self, count: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            self._scan()
            if len(self.cards) >= count:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    async def steady(self, urls: list[str], events: int, senders: int) -> tuple[list[float], float]:
        """`senders` concurrent senders, `events` in all; (ack ms, answers per second)."""
        acks: list[float] = []
        todo = iter(range(events))
        start_answers = self.answers

        async def sender(k: int) -> None:
            for i in todo:
                acks.append(await self.post(urls[(i + k) % len(urls)], self.event()))

        with harness_collector_paused():
            started = time.perf_counter()
            await asyncio.gather(*(sender(k) for k in range(senders)))
            answered = await self.wait_answers(start_answers + events, within=60 + events / 2)
            wall = time.perf_counter() - started
        if not answered:
            print(f"    ! only {self.answers - start_answers} of {events} answered", flush=True)
        return acks, (self.answers - start_answers) / wall

    async def burst(self, urls: list[str], events: int, within: float) -> tuple[list[float], float | None]:
        """`events` POSTed at the same instant; (ack ms, seconds until all were answered or None)."""
        start_answers = self.answers
        payloads = [self.event() for _ in range(events)]
        with harness_collector_paused():
            started = time.perf_counter()
            acks = await asyncio.gather(*(self.post(urls[i % len(urls)], p) for i, p in enumerate(payloads)))
            answered = await self.wait_answers(start_answers + events, within)
            finished = time.perf_counter()
        return list(acks), (finished - started) if answered else None


# ---------------------------------------------------------------------- the model
class Script:
    """What the scripted model answers, by phase."""

    def __init__(self) -> None:
        self.mode = "turn"
        self.delay = 0.0
        self.leads = 0

    def __call__(self, body: dict[str, Any]) -> Reply:
        last = body["messages"][-1]
        if self.mode == "slow":
            return text(ANSWER, delay=self.delay)
        if last["role"] == "tool":
            return text(ANSWER)
        if self.mode == "write":
            self.leads += 1
            lead = {"name": f"Lead {self.leads}", "email": f"lead{self.leads}-{uuid.uuid4().hex[:6]}@example.com", "need": "x"}
            return calls(("create_crm_lead", lead))
        return calls(("search_crm_leads", {"query": "x"}))


# ---------------------------------------------------------------------- the bench
@dataclass
class Options:
    quick: bool
    db: str
    postgres_url: str
    serve_args: list[str]
    phases: set[str]
    steady_events: int = 300
    burst: int = 200
    big_burst: int = 1000
    pending: int = 1000
    replica_approvals: int = 100
    model_delay: float = 2.0
    profile: Path | None = None
    bot_env: list[str] = field(default_factory=list)  # NAME=VALUE settings for every chatops process


class Bench:
    def __init__(self, opts: Options, tmp: Path, slack: FakeSlackApi, model: ScriptedModel, http: aiohttp.ClientSession) -> None:
        self.opts, self.tmp, self.slack, self.model, self.http = opts, tmp, slack, model, http
        self.script = Script()
        model.responder = self.script
        self.load = Load(slack, http)
        self.report = Report()
        self._schemas: list[str] = []
        self.bot_conversations = 0  # answered by the single chatops process: idle when the memory is measured

    # -------------------------------------------------------------- processes
    def env(self, database_url: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "FEISHU_", "CHATOPS_", "OPENAI_"))}
        env.update(
            OPENAI_BASE_URL=self.model.url,
            OPENAI_API_KEY="sk-bench-not-a-real-key",
            CHATOPS_MODEL="scripted-model",
            DATABASE_URL=database_url,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_API_URL=self.slack.url,
            SLACK_SIGNING_SECRET=SIGNING_SECRET,
            CHATOPS_LOG_LEVEL="WARNING",
            **dict(setting.split("=", 1) for setting in self.opts.bot_env),
            **extra,
        )
        return env

    def database(self) -> str:
        if self.opts.db == "sqlite":
            return f"sqlite:///{self.tmp / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        return self.pg_schema()

    def pg_schema(self) -> str:
        import sqlalchemy as sa

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        engine = sa.create_engine(sa.make_url(self.opts.postgres_url).set(drivername="postgresql+psycopg"))
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        engine.dispose()
        self._schemas.append(schema)
        return f"{self.opts.postgres_url}?options=-csearch_path%3D{schema}"

    def drop_schemas(self) -> None:
        if not self._schemas:
            return
        import sqlalchemy as sa

        engine = sa.create_engine(sa.make_url(self.opts.postgres_url).set(drivername="postgresql+psycopg"))
        with engine.begin() as conn:
            for schema in self._schemas:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()

    async def chatops(self, name: str, database_url: str, **extra: str) -> Server:
        port = free_port()
        chatops = [str(Path(sys.executable).with_name("chatops"))]
        if self.opts.profile is not None:  # cProfile of the process, written when it stops
            self.opts.profile.mkdir(parents=True, exist_ok=True)
            profile = self.opts.profile / f"{name}.prof"
            chatops = [sys.executable, "-m", "cProfile", "-o", str(profile), chatops[0]]
        argv = [*chatops, "serve", *self.opts.serve_args]
        server = Server(name, argv, self.env(database_url, CHATOPS_PORT=str(port), **extra), self.tmp, port)
        await server.start(self.http, ready="/readyz", within=120)
        return server

    async def bare(self) -> Server:
        port = free_port()
        argv = [
            sys.executable,
            str(ROOT / "benchmarks" / "bare_bolt.py"),
            str(port),
            self.slack.url,
            SIGNING_SECRET,
            BOT_TOKEN,
            ANSWER,
        ]
        server = Server("bare-bolt", argv, dict(os.environ), self.tmp, port)
        await server.start(self.http)
        return server

    # -------------------------------------------------------------- phases
    async def steady(self, bare: Server, bot: Server) -> None:
        n = self.opts.steady_events
        self.script.mode = "turn"
        for senders in (4, 20):
            print(f"steady load: {n} events, {senders} concurrent senders", flush=True)
            bare_acks, bare_rate = await self.load.steady([bare.url], n, senders)
            bot_acks, bot_rate = await self.load.steady([bot.url], n, senders)
            self.bot_conversations += n
            for p in (50, 99):
                b, c = pct(bare_acks, p), pct(bot_acks, p)
                self.report.add(
                    f"ack p{p}, {senders} senders (ms)", f"{b:.1f}", f"{c:.1f}", f"{c / b:.2f}×", "≤ 1.5×", c / b <= 1.5
                )
            ratio = bot_rate / bare_rate
            self.report.add(
                f"turns/s vs bare replies/s, {senders} senders", f"{bare_rate:.0f}/s", f"{bot_rate:.0f}/s", f"{ratio:.2f}×", "≥ 0.5×",
                ratio >= 0.5,
            )  # fmt: skip

    async def bursts(self, bare: Server, bot: Server) -> None:
        self.script.mode, self.script.delay = "slow", self.opts.model_delay
        for n, ack_goal, answer_goal in ((self.opts.burst, 1000, 6.0), (self.opts.big_burst, 3000, None)):
            print(f"burst: {n} conversations at once, {self.opts.model_delay:g} s model", flush=True)
            refused = self.load.refused
            bare_acks, bare_all = await self.load.burst([bare.url], n, within=120)
            bare_refused, refused = self.load.refused - refused, self.load.refused
            bot_acks, bot_all = await self.load.burst([bot.url], n, within=120 + n / 5)
            bot_refused = self.load.refused - refused
            self.bot_conversations += n
            if bare_refused or bot_refused:
                self.report.add(f"{n} at once: refused with 5xx, delivered again", str(bare_refused), str(bot_refused))
            b, c = max(bare_acks), max(bot_acks)
            self.report.add(f"{n} at once: ack p50 (ms)", f"{pct(bare_acks, 50):.0f}", f"{pct(bot_acks, 50):.0f}",
                            f"{pct(bot_acks, 50) / pct(bare_acks, 50):.2f}×")  # fmt: skip
            self.report.add(
                f"{n} at once: ack max (ms)", f"{b:.0f}", f"{c:.0f}", f"{c / b:.2f}×", f"every ack < {ack_goal} ms", c < ack_goal
            )
            shown = "never" if bot_all is None else f"{bot_all:.1f} s"
            self.report.add(
                f"{n} at once: all answered after", "n/a" if bare_all is None else f"{bare_all:.1f} s", shown, "",
                f"≤ {answer_goal:g} s" if answer_goal else "", None if answer_goal is None else bot_all is not None and bot_all <= answer_goal,
            )  # fmt: skip

    async def memory(self, bot: Server) -> None:
        n = self.opts.pending
        print(f"memory: {n} pending approvals on top of the idle conversations", flush=True)
        self.script.mode = "write"
        before = len(self.load.cards)
        for first in range(0, n, 100):
            await asyncio.gather(*(self.load.post(bot.url, self.load.event()) for _ in range(min(100, n - first))))
        if not await self.load.wait_cards(before + n, within=120 + n / 5):
            print(f"    ! only {len(self.load.cards) - before} of {n} cards posted", flush=True)
        await asyncio.sleep(2)  # let the sweeper and the audit chainer run over the full tables
        loaded = bot.rss()
        idle = self.bot_conversations
        self.report.add(f"RSS per process right after the load: {n} pending approvals, {idle} idle conversations (MB)", "",
                        " / ".join(f"{s:.0f}" for s in loaded), "", "")  # fmt: skip
        # The same database served by a fresh process: what it holds, without the high-water mark of the bursts.
        await bot.stop()
        again = await self.chatops("chatops-restarted", bot.env["DATABASE_URL"])
        await asyncio.sleep(3)  # a sweeper pass over the pending approvals and the idle conversations
        sizes = again.rss()
        await again.stop()
        self.report.add(f"RSS per process, {n} pending approvals + {idle} idle conversations, after a restart (MB)", "",
                        " / ".join(f"{s:.0f}" for s in sizes), "", "< 150 MB", max(sizes) < 150)  # fmt: skip

    async def idle_memory(self, bare: Server) -> None:
        from tests.fakes.feishu_api import FakeFeishu
        from tests.feishu_helpers import feishu_env

        print("memory: idle processes", flush=True)
        self.report.add("RSS bare Bolt, after the load (MB)", f"{max(bare.rss()):.0f}", "", "", "")
        bot = await self.chatops("idle-slack", self.database())
        await asyncio.sleep(1)
        self.report.add(
            "RSS idle, Slack only (MB)", "", " / ".join(f"{s:.0f}" for s in bot.rss()), "", "< 150 MB", max(bot.rss()) < 150
        )
        await bot.stop()
        feishu = await FakeFeishu().start()
        try:
            bot = await self.chatops("idle-feishu", self.database(), **feishu_env(feishu, mode="ws"))
            await asyncio.sleep(1)
            sizes = bot.rss()
            await bot.stop()
        finally:
            await feishu.stop()
        self.report.add(
            "RSS idle, Slack + Feishu (MB)", "", " / ".join(f"{s:.0f}" for s in sizes), "", "< 150 MB", max(sizes) < 150
        )

    async def replicas(self, bare: Server) -> None:
        if not await self._postgres_answers():
            self.report.add("three replicas on one PostgreSQL", "", f"skipped: no PostgreSQL at {self.opts.postgres_url}")
            return
        url = self.pg_schema()
        print("three replicas on one PostgreSQL", flush=True)
        self.script.mode = "turn"
        _, floor = await self.load.steady([bare.url], self.opts.steady_events, 20)
        # 3 replicas x (front + workers) processes, each with a pool of up to 2 x CHATOPS_DB_POOL_SIZE connections,
        # must stay under PostgreSQL's max_connections (100 by default; README, "Several replicas on PostgreSQL").
        pool = {"CHATOPS_DB_POOL_SIZE": "4"}
        bots = [await self.chatops("replica-1", url, **pool)]
        bots += await asyncio.gather(self.chatops("replica-2", url, **pool), self.chatops("replica-3", url, **pool))
        try:
            urls = [b.url for b in bots]
            self.script.mode = "turn"
            n = self.opts.steady_events
            acks, rate = await self.load.steady(urls, n, 20)
            self.report.add(
                f"3 replicas, {n} events spread, 20 senders: turns/s", f"{floor:.0f}/s", f"{rate:.0f}/s", f"{rate / floor:.2f}×", "",
            )  # fmt: skip
            self.report.add("3 replicas: ack p99 (ms)", "", f"{pct(acks, 99):.1f}")
            await self._approvals_once(bots, url)
        finally:
            await asyncio.gather(*(b.stop() for b in bots))

    async def _approvals_once(self, bots: list[Server], url: str) -> None:
        n = self.opts.replica_approvals
        self.script.mode = "write"
        before_cards, before_answers = len(self.load.cards), self.load.answers
        await asyncio.gather(*(self.load.post(bots[i % 3].url, self.load.event()) for i in range(n)))
        if not await self.load.wait_cards(before_cards + n, within=60 + n):
            print(f"    ! only {len(self.load.cards) - before_cards} of {n} cards posted", flush=True)
        cards = open_cards(self.slack, self.load.cards[before_cards:])
        started = time.perf_counter()
        clicks = []
        for message in cards:
            payload = click(message, user=card_requester(message))
            clicks += [self.load.post(b.url, payload) for b in bots]  # the same click reaches every replica
        await asyncio.gather(*clicks)
        answered = await self.load.wait_answers(before_answers + len(cards), within=60 + n)
        wall = time.perf_counter() - started
        executions = await self._executions(url)
        once = sum(1 for c in executions.values() if c == 1)
        more = sum(1 for c in executions.values() if c > 1)
        self.report.add(
            f"3 replicas: {len(cards)} approvals, each click sent to all 3", "",
            f"{once} executed once, {more} more than once, {len(cards) - len(executions)} never; "
            f"{'all' if answered else 'NOT all'} answered in {wall:.1f} s", "", "exactly one execution each",
            once == len(cards) and more == 0,
        )  # fmt: skip

    async def _executions(self, url: str) -> dict[str, int]:
        import sqlalchemy as sa

        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        query = sa.text(
            "SELECT approval_id, count(*) FROM (SELECT approval_id, kind FROM audit_event UNION ALL "
            "SELECT approval_id, kind FROM audit_staged) rows WHERE kind = 'tool_executed' AND approval_id IS NOT NULL "
            "GROUP BY approval_id"
        )
        try:
            with engine.connect() as conn:
                return {str(a): int(c) for a, c in conn.execute(query)}
        finally:
            engine.dispose()

    async def _postgres_answers(self) -> bool:
        import sqlalchemy as sa

        def ping() -> bool:
            try:
                engine = sa.create_engine(sa.make_url(self.opts.postgres_url).set(drivername="postgresql+psycopg"))
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                engine.dispose()
                return True
            except Exception:  # noqa: BLE001 - any failure means "no PostgreSQL here"
                return False

        return await asyncio.to_thread(ping)

    # -------------------------------------------------------------- all
    async def run(self) -> str:
        phases = self.opts.phases
        bare = await self.bare()
        bot: Server | None = None
        try:
            bot = await self.chatops("chatops", self.database())
            if "steady" in phases:
                await self.steady(bare, bot)
            if "burst" in phases:
                await self.bursts(bare, bot)
            if "memory" in phases:
                await self.memory(bot)
            await bot.stop()
            if "memory" in phases:
                await self.idle_memory(bare)
            if "replicas" in phases:
                await self.replicas(bare)
        finally:  # bare Bolt does not outlive a bot that could not start
            await asyncio.gather(bare.stop(), *([bot.stop()] if bot is not None else []))
            self.drop_schemas()
        return self.report.markdown()


def card_requester(card: dict[str, Any]) -> str:
    """The requester a card names (`<@U…>`): the person whose mention started the conversation."""
    found = json.dumps(card.get("blocks") or "")
    start = found.find("<@U")
    return found[start + 2 : found.find(">", start)] if start >= 0 else "U0ALICE"


def open_cards(slack: FakeSlackApi, posted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored messages (with their `ts`) of the cards posted, found by approval id."""
    wanted = {approval_id_of(card) for card in posted}
    found = []
    for message in slack.messages.values():
        with contextlib.suppress(AssertionError, TypeError, KeyError):
            if message.get("blocks") and approval_id_of(message) in wanted:
                found.append(message)
    return found


@contextlib.asynccontextmanager
async def fakes() -> AsyncIterator[tuple[FakeSlackApi, ScriptedModel, aiohttp.ClientSession]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with FakeSlackApi() as slack, ScriptedModel() as model, aiohttp.ClientSession(connector=connector) as http:
        yield slack, model, http


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller loads (100 events, bursts of 200 and 500, 200 pending)")
    parser.add_argument(
        "--db", choices=("sqlite", "postgres"), default="sqlite", help="the database of the single chatops process"
    )
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--serve-args", default="", help='extra `chatops serve` flags, e.g. --serve-args="--workers 2"')
    parser.add_argument(
        "--bot-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for every chatops process (repeatable)"
    )
    parser.add_argument("--phases", default="steady,burst,memory,replicas", help="comma-separated subset")
    parser.add_argument("--events", type=int, help="events per steady-load run (default 300, quick 100)")
    parser.add_argument("--burst", type=int, help="the first burst (default 200)")
    parser.add_argument("--big-burst", type=int, help="the second burst (default 1000, quick 500)")
    parser.add_argument("--pending", type=int, help="pending approvals for the memory figure (default 1000, quick 200)")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--keep", type=Path, help="keep the processes' logs and databases in this folder")
    parser.add_argument("--profile", type=Path, help="run each chatops process under cProfile, writing DIR/<name>.prof")
    args = parser.parse_args()
    opts = Options(args.quick, args.db, args.postgres_url, shlex.split(args.serve_args), set(args.phases.split(",")))
    if args.quick:
        opts.steady_events, opts.big_burst, opts.pending, opts.replica_approvals = 100, 500, 200, 30
    opts.profile = args.profile
    opts.bot_env = args.bot_env
    opts.steady_events = args.events or opts.steady_events
    opts.burst = args.burst or opts.burst
    opts.big_burst = args.big_burst or opts.big_burst
    opts.pending = args.pending or opts.pending
    started = time.perf_counter()
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory() as tmp:
        await asyncio.to_thread(Path(tmp).mkdir, parents=True, exist_ok=True)
        async with fakes() as (slack, model, http):
            table = await Bench(opts, Path(tmp), slack, model, http).run()
    print(
        f"\nchatops serve {' '.join(opts.serve_args)} vs bare Bolt, database {opts.db}, {time.perf_counter() - started:.0f} s in all"
    )
    print(table)
    if args.output:
        args.output.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main())
