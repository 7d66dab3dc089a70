"""Chaos campaign: two `chatops serve --workers 2` replicas on one PostgreSQL schema, a fake Slack, a
scripted model whose conversations do a read tool and (every other one) a write tool (`send_email`
to a fake SMTP server: its deliveries are the tool's own side effects), and faults injected from
outside at random moments:

* SIGSTOP / SIGCONT of the PostgreSQL server processes serving the bot (found in pg_stat_activity
  by application_name = the campaign's schema), some or all, for 1-12 s;
* pg_terminate_backend of some or all of them;
* SIGKILL of one worker process, or of a whole replica (front + workers; restarted at once);
* the fake Slack answering 429 (Retry-After), 500, or hanging (20 s, then 503, nothing recorded).

Clicks (signed `block_actions`) go to one replica or to both at once. After the chaos, everything
is left to settle (bounded), and the campaign checks from the database, the fake Slack, the fake
SMTP server and the logs: one final answer per message, no stuck run/approval/inbox/outbox row,
each approval's tool run at most once (audit rows and SMTP deliveries), every in_doubt reported in
its thread, no traceback in any chat message, `chatops audit verify`, and alarming log lines.

    .venv/bin/python benchmarks/chaos_pg.py [--conversations 300] [--rate 1.5] [--seed 1] [--keep DIR]

`--long-stop S` replaces the chaos with one fault: the server processes inside a transaction that
have updated rows (they hold those rows' locks) are stopped once, for S s; longer than the retry
deadline and the outbox claim (75 s, say), it checks that a delivered answer whose "sent" mark meets
such a lock is still posted once (the mark is recorded beside the row, `bot.core.outbox`).

Exit status 0 when every check held, 1 otherwise. Needs to run as root (it signals PostgreSQL's
server processes) with PostgreSQL at --postgres-url.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.openai_server import Reply, ScriptedModel, calls, text  # noqa: E402
from tests.fakes.slack_api import TEAM_ID, FakeSlackApi  # noqa: E402
from tests.fakes.smtp_server import FakeSmtp  # noqa: E402
from tests.slack_helpers import APPROVE_ACTION, BOT_TOKEN, SIGNING_SECRET, click, event_body  # noqa: E402

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
AUDIT_KEY = "chaos-campaign-audit-key-0123456789abcdef"
FINAL = re.compile(r"chaos-final (\d+)\b")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    out.append(int(entry))
    return out


# ---------------------------------------------------------------------- fakes with faults
@dataclass
class ChaosSlack(FakeSlackApi):
    """The fake Slack, plus a `mode`: ok, 429, 500 or hang (auth.test always answers)."""

    mode: str = "ok"
    faulted: Counter[str] = field(default_factory=Counter)

    async def _api(self, request: web.Request) -> web.Response:
        mode, method = self.mode, request.match_info["method"]
        if mode != "ok" and method != "auth.test":
            await request.read()
            self.faulted[mode] += 1
            if mode == "429":
                return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "2"})
            if mode == "500":
                return web.Response(status=500, text="internal error")
            await asyncio.sleep(20)  # hang: the bot's attempt ends first; nothing is recorded
            return web.Response(status=503, text="late")
        return await super()._api(request)


@dataclass
class SlowSmtp(FakeSmtp):
    """The fake SMTP server; each DATA takes 0-`delay` s (so faults land while a write tool runs)."""

    delay: float = 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(random.uniform(0, self.delay))
        return await super().handle_DATA(server, session, envelope)


class Model:
    """Conversation n ('request n'): a read tool, then for odd n a write tool, then 'chaos-final n'."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.rng = random.Random()

    def __call__(self, body: dict[str, Any]) -> Reply:
        messages = body["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        found = re.search(r"request (\d+)", str(messages[last_user]["content"]))
        if not found:
            return text("chaos-other")
        n = int(found.group(1))
        steps = sum(1 for m in messages[last_user + 1 :] if m["role"] == "assistant" and m.get("tool_calls"))
        delay = self.rng.uniform(0.05, 0.6)
        if steps == 0:
            return calls(("search_crm_leads", {"query": f"q{n}"}), delay=delay)
        if steps == 1 and n % 2 == 1:
            mail = {"to": "ops@example.com", "subject": f"chaos-{self.tag}-{n}", "body": f"conversation {n}"}
            return calls(("send_email", mail), delay=delay)
        if n % 5 == 0:  # a long answer: streamed into the thread (chat.startStream / appendStream / stopStream)
            return text(f"chaos-final {n}\n" + "\n".join(f"line {i} of a long answer" for i in range(90)), delay=delay)
        return text(f"chaos-final {n}", delay=delay)


# ---------------------------------------------------------------------- replicas
class Replica:
    def __init__(self, name: str, env: dict[str, str], cwd: Path, workers: int) -> None:
        self.name, self.env, self.cwd, self.workers = name, env, cwd, workers
        self.port = free_port()
        self.log = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slack/events"

    def spawn(self) -> None:
        env = {**self.env, "CHATOPS_PORT": str(self.port)}
        argv = [str(Path(sys.executable).with_name("chatops")), "serve", "--workers", str(self.workers)]
        with open(self.log, "ab") as out:
            out.write(f"\n===== start {self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
            self.proc = subprocess.Popen(
                argv, env=env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.starts += 1

    async def ready(self, http: aiohttp.ClientSession, within: float = 90) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{self.port}/readyz", timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(0.3)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_all(self) -> None:
        if self.proc is None:
            return
        pids = [self.proc.pid, *children_of(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def kill_worker(self) -> int | None:
        if not self.alive():
            return None
        kids = children_of(self.proc.pid)  # type: ignore[union-attr]
        if not kids:
            return None
        pid = random.choice(kids)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return pid

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.kill_all()


# ---------------------------------------------------------------------- the campaign
@dataclass
class Conv:
    n: int
    user: str
    channel: str
    ts: str
    acked_at: float | None = None
    deliveries: int = 0
    refused: int = 0


class Campaign:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.rng = random.Random(args.seed)
        self.tag = uuid.uuid4().hex[:6]
        self.schema = f"chaos_{self.tag}"
        base = args.postgres_url
        self.admin = sa.create_engine(sa.make_url(base).set(drivername="postgresql+psycopg"), pool_size=2)
        self.db_url = f"{base}?options=-csearch_path%3D{self.schema}&application_name={self.schema}"
        self.convs: dict[int, Conv] = {}
        self.faults: Counter[str] = Counter()
        self.fault_log: list[str] = []
        self.stopped: set[int] = set()
        self.clicks: Counter[str] = Counter()  # approval id -> click POSTs that were answered 200
        self.click_fail: Counter[str] = Counter()
        self.last_click: dict[str, float] = {}
        self.chaos_on = True
        self.verifier = SignatureVerifier(SIGNING_SECRET)
        self.replicas: list[Replica] = []
        self.restarting: set[str] = set()
        self._clicks: set[asyncio.Task[None]] = set()

    # -------------------------------------------------------------- setup
    def env(self, slack: FakeSlackApi, model: ScriptedModel, smtp: FakeSmtp) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "FEISHU_", "CHATOPS_", "OPENAI_", "SMTP_"))}
        env.update(
            OPENAI_BASE_URL=model.url,
            OPENAI_API_KEY="sk-chaos-not-a-real-key",
            CHATOPS_MODEL="scripted-model",
            CHATOPS_MODEL_TIMEOUT="10",
            DATABASE_URL=self.db_url,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_API_URL=slack.url,
            SLACK_SIGNING_SECRET=SIGNING_SECRET,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(smtp.port),
            SMTP_SECURITY="none",
            SMTP_FROM="bot@example.com",
            SMTP_TIMEOUT="5",
            CHATOPS_EMAIL_ALLOWED_DOMAINS="example.com",
            CHATOPS_TOOL_TIMEOUT="10",
            CHATOPS_LOG_LEVEL="INFO",
            CHATOPS_DB_STALL_SECONDS=str(self.args.stall),
            CHATOPS_LEASE_SECONDS=str(self.args.lease),
            CHATOPS_SWEEP_INTERVAL="2",
            CHATOPS_DB_POOL_SIZE="4",
            CHATOPS_AUDIT_KEY=AUDIT_KEY,
            CHATOPS_AUDIT_ANCHOR_FILE=str(self.tmp / "anchors.jsonl"),
        )
        return env

    def create_schema(self) -> None:
        with self.admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))

    def drop_schema(self) -> None:
        with self.admin.begin() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a"), {"a": self.schema}
            )
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))

    # -------------------------------------------------------------- Slack deliveries
    async def post(self, url: str, payload: dict[str, Any], retry: int = 0) -> int:
        if payload.get("type") == "block_actions":
            body = ("payload=" + urllib.parse.quote(json.dumps(payload))).encode()
            ctype = "application/x-www-form-urlencoded"
        else:
            body, ctype = json.dumps(payload).encode(), "application/json"
        ts = str(int(time.time()))
        headers = {"X-Slack-Request-Timestamp": ts, "Content-Type": ctype,
                   "X-Slack-Signature": self.verifier.generate_signature(timestamp=ts, body=body)}  # fmt: skip
        if retry:
            headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_error"})
        try:
            async with self.http.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=3)) as r:
                await r.read()
                return r.status
        except (TimeoutError, aiohttp.ClientError):
            return 599  # no answer within Slack's 3 s, or nobody listening

    async def converse(self, n: int) -> None:
        user = f"U0CH{n % 20:02d}"
        conv = Conv(n, user, f"C0CH{n % 10:02d}", f"1720000000.{n:06d}")
        self.convs[n] = conv
        event = {"type": "app_mention", "user": user, "team": TEAM_ID, "text": f"<@U0BOT> request {n}",
                 "channel": conv.channel, "ts": conv.ts, "event_ts": conv.ts}  # fmt: skip
        payload = event_body(event, f"Ev{self.tag}{n:05d}")
        deadline = time.monotonic() + 120
        retry = 0
        while time.monotonic() < deadline:
            replica = self.replicas[(n + retry) % len(self.replicas)]
            status = await self.post(replica.url, payload, retry)
            conv.deliveries += 1
            if status == 200:
                conv.acked_at = time.monotonic()
                return
            conv.refused += 1
            retry += 1
            await asyncio.sleep(min(5, 0.5 * retry))
        log(f"conversation {n}: never acked")

    # -------------------------------------------------------------- clicks
    def open_cards(self) -> list[dict[str, Any]]:
        cards = []
        for message in list(self.slack.messages.values()):
            blocks = message.get("blocks")
            if not blocks:
                continue
            if isinstance(blocks, str):
                blocks = json.loads(blocks)
            for block in blocks:
                for element in block.get("elements", []) if isinstance(block, dict) else []:
                    if isinstance(element, dict) and element.get("action_id") == APPROVE_ACTION:
                        cards.append({**message, "blocks": blocks, "_approval": str(element["value"])})
        return cards

    async def click_one(self, card: dict[str, Any]) -> None:
        approval = card["_approval"]
        n = int(card["thread_ts"].split(".")[1]) if card.get("thread_ts") else -1
        user = self.convs[n].user if n in self.convs else "U0CH00"
        payload = click(card, user=user)
        alive = [r for r in self.replicas if r.alive()] or self.replicas
        targets = alive if self.rng.random() < 0.35 and len(alive) > 1 else [self.rng.choice(alive)]
        statuses = await asyncio.gather(*(self.post(r.url, payload) for r in targets))
        for status in statuses:
            if status == 200:
                self.clicks[approval] += 1
            else:
                self.click_fail[approval] += 1

    async def clicker(self) -> None:
        while True:
            now = time.monotonic()
            todo = [c for c in self.open_cards() if now - self.last_click.get(c["_approval"], -1e9) > 15]
            for card in todo:
                self.last_click[card["_approval"]] = now
                task = asyncio.create_task(self.click_one(card))
                self._clicks.add(task)
                task.add_done_callback(self._clicks.discard)
            await asyncio.sleep(0.5)

    # -------------------------------------------------------------- faults
    def backends(self) -> list[tuple[int, str, str]]:
        with self.admin.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT pid, coalesce(state, ''), left(coalesce(query, ''), 60) FROM pg_stat_activity "
                    "WHERE application_name = :a AND pid <> pg_backend_pid()"
                ),
                {"a": self.schema},
            ).all()
        return [(int(p), s, q) for p, s, q in rows]

    def note(self, kind: str, detail: str) -> None:
        self.faults[kind] += 1
        self.fault_log.append(f"{time.strftime('%H:%M:%S')} {kind} {detail}")
        log(f"FAULT {kind} {detail}")

    async def fault_stop_backends(self) -> None:
        found = await asyncio.to_thread(self.backends)
        if not found:
            return
        chosen = found if self.rng.random() < 0.3 else self.rng.sample(found, k=self.rng.randint(1, max(1, len(found) // 3)))
        hold = self.rng.choice([1.5, 3, 5, 8, 12])
        for pid, _, _ in chosen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self.stopped.add(pid)
        states = Counter(s for p, s, _ in chosen)
        self.note("sigstop", f"{len(chosen)}/{len(found)} backends for {hold}s ({dict(states)})")
        await asyncio.sleep(hold)
        self.cont_all()

    def cont_all(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.stopped.discard(pid)

    async def fault_terminate(self) -> None:
        found = await asyncio.to_thread(self.backends)
        if not found:
            return
        chosen = found if self.rng.random() < 0.4 else self.rng.sample(found, k=self.rng.randint(1, len(found)))

        def terminate() -> None:
            with self.admin.begin() as conn:
                for pid, _, _ in chosen:
                    conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})

        await asyncio.to_thread(terminate)
        self.note("terminate", f"{len(chosen)}/{len(found)} backends")

    async def fault_kill_worker(self) -> None:
        replica = self.rng.choice(self.replicas)
        pid = replica.kill_worker()
        if pid:
            self.note("kill-worker", f"{replica.name} worker {pid}")

    async def fault_kill_replica(self) -> None:
        replica = self.rng.choice(self.replicas)
        if replica.name in self.restarting or not replica.alive():
            return
        self.restarting.add(replica.name)
        try:
            replica.kill_all()
            self.note("kill-replica", replica.name)
            await asyncio.sleep(self.rng.uniform(0.5, 4))
            replica.spawn()
            if not await replica.ready(self.http):
                log(f"{replica.name} not ready after restart")
        finally:
            self.restarting.discard(replica.name)

    async def fault_slack(self) -> None:
        mode = self.rng.choice(["429", "500", "hang"])
        hold = self.rng.uniform(3, 12)
        self.slack.mode = mode
        self.note("slack", f"{mode} for {hold:.1f}s")
        await asyncio.sleep(hold)
        self.slack.mode = "ok"

    async def long_stop(self, after: float, hold: float) -> None:
        """One fault only: `after` s in, stop the server processes that are inside a transaction and have
        updated rows (they hold those rows' locks) for `hold` s."""
        await asyncio.sleep(after)
        while self.chaos_on:
            chosen = [
                b for b in await asyncio.to_thread(self.backends) if b[1] == "idle in transaction" and b[2].startswith("UPDATE")
            ]
            if chosen:
                for pid, _, _ in chosen:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        self.stopped.add(pid)
                self.note("long-stop", f"{len(chosen)} backends inside a transaction for {hold}s: {[q for _, _, q in chosen]}")
                await asyncio.sleep(hold)
                self.cont_all()
                return
            await asyncio.sleep(0.05)

    CHAOS_PAUSE = (1.5, 5.0)  # seconds between two faults (uniform)

    def fault_kinds(self) -> list[tuple[Callable[[], Awaitable[None]], int]]:
        """The faults this campaign injects, with their weights."""
        return [
            (self.fault_stop_backends, 4),
            (self.fault_terminate, 3),
            (self.fault_kill_worker, 2),
            (self.fault_kill_replica, 1),
            (self.fault_slack, 2),
        ]

    async def chaos(self) -> None:
        kinds = self.fault_kinds()
        running: set[asyncio.Task[None]] = set()
        try:
            while self.chaos_on:
                await asyncio.sleep(self.rng.uniform(*self.CHAOS_PAUSE))
                if not self.chaos_on:
                    break
                fn = self.rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
                if fn == self.fault_slack and self.slack.mode != "ok":
                    continue
                task = asyncio.create_task(fn())
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running, return_exceptions=True)
        finally:
            self.cont_all()
            self.slack.mode = "ok"

    # -------------------------------------------------------------- checks
    def answers(self) -> dict[int, list[dict[str, Any]]]:
        found: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for message in list(self.slack.messages.values()):
            m = FINAL.search(str(message.get("text") or ""))
            if m:
                found[int(m.group(1))].append(message)
        return found

    # The dialect's spelling of what the state queries need (SQLite's campaign has its own).
    SQL_NOW, SQL_SUBJECT, SQL_THREAD_TS = "now()", "args->>'subject'", "thread->>'thread_ts'"

    def enter_schema(self, conn: sa.Connection) -> None:
        conn.execute(sa.text(f'SET search_path TO "{self.schema}"'))

    def db_state(self) -> dict[str, Any]:
        now = self.SQL_NOW
        with self.admin.connect() as conn:
            self.enter_schema(conn)

            def q(sql: str) -> list[Any]:
                return list(conn.execute(sa.text(sql)).all())

            return {
                "runs": dict(q("SELECT status, count(*) FROM run GROUP BY 1")),
                "runs_running_expired": q(f"SELECT id, owner, lease_until, updated_at FROM run WHERE status='running' AND (lease_until IS NULL OR lease_until < {now})"),
                "runs_running": q("SELECT id FROM run WHERE status='running'"),
                "inbox": dict(q("SELECT status, count(*) FROM inbox_event GROUP BY 1")),
                "approvals": dict(q("SELECT status, count(*) FROM approval GROUP BY 1")),
                "approvals_rows": q(f"SELECT id, status, {self.SQL_SUBJECT}, {self.SQL_THREAD_TS}, outcome, run_id FROM approval"),
                "outbox": dict(q("SELECT status, count(*) FROM outbox_job GROUP BY 1")),
                "outbox_due": q(f"SELECT id, kind, attempts, last_error FROM outbox_job WHERE status='pending' AND next_attempt_at <= {now}"),
                "outbox_gave_up": q("SELECT id, kind, attempts, last_error, thread_key FROM outbox_job WHERE status='gave_up'"),
                "executed": dict(q("SELECT approval_id, count(*) FROM (SELECT approval_id, kind FROM audit_event UNION ALL "
                                   "SELECT approval_id, kind FROM audit_staged) r WHERE kind='tool_executed' AND approval_id IS NOT NULL GROUP BY 1")),
                "waiting_decided": q("SELECT r.id FROM run r WHERE r.status='waiting' AND NOT EXISTS (SELECT 1 FROM approval a "
                                     "WHERE a.run_id=r.id AND a.status IN ('pending','approved','executing'))"),
                "audit_kinds": dict(q("SELECT kind, count(*) FROM (SELECT kind FROM audit_event UNION ALL SELECT kind FROM audit_staged) r GROUP BY 1")),
            }  # fmt: skip

    def settled(self, state: dict[str, Any]) -> bool:
        answered = self.answers()
        all_answered = all(n in answered for n in self.convs)
        return (
            all_answered
            and not state["runs_running"]
            and not state["outbox_due"]
            and state["inbox"].get("queued", 0) == 0
            and not state["waiting_decided"]
            and not any(s in state["approvals"] for s in ("approved", "executing", "pending"))
        )

    async def settle(self, within: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            state = await asyncio.to_thread(self.db_state)
            if self.settled(state) or time.monotonic() > deadline:
                return state
            await asyncio.sleep(2)

    def check(self, state: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        answered = self.answers()
        for n in sorted(self.convs):
            got = answered.get(n, [])
            if len(got) != 1:
                thread = [m.get("text") for m in self.slack.messages.values() if m.get("thread_ts") == self.convs[n].ts]
                problems.append(f"conversation {n}: {len(got)} final answers; thread: {thread!r:.600}")
        if state["runs_running"]:
            problems.append(f"runs still running: {state['runs_running']}")
        if state["waiting_decided"]:
            problems.append(f"runs waiting with every approval decided: {state['waiting_decided']}")
        if state["inbox"].get("queued"):
            problems.append(f"inbox queued: {state['inbox']}")
        if state["outbox_due"]:
            problems.append(f"outbox jobs due and not sent: {state['outbox_due'][:10]}")
        for status in ("approved", "executing", "pending"):
            if state["approvals"].get(status):
                problems.append(f"approvals left {status}: {[r for r in state['approvals_rows'] if r[1] == status][:10]}")
        mails = Counter(str(r.message()["Subject"]) for r in self.smtp.delivered)
        attempts = Counter(str(r.message()["Subject"]) for r in self.smtp.attempts)
        for approval_id, status, subject, thread_ts, _outcome, _run in state["approvals_rows"]:
            executed = state["executed"].get(approval_id, 0)
            if executed > 1 or attempts.get(subject, 0) > 1:
                problems.append(
                    f"approval {approval_id} ({subject}): {executed} tool_executed rows, {attempts.get(subject, 0)} SMTP DATA attempts"
                )
            if status == "succeeded" and mails.get(subject, 0) != 1:
                problems.append(f"approval {approval_id} ({subject}) succeeded but {mails.get(subject, 0)} mails delivered")
            if status == "in_doubt":
                conv = self.convs.get(int(str(subject).rsplit("-", 1)[1]))
                root = conv.ts if conv else thread_ts
                thread = [str(m.get("text") or "") + json.dumps(m.get("blocks") or "") for m in self.slack.messages.values()
                          if m.get("thread_ts") == root or m.get("ts") == root]  # fmt: skip
                if not any(approval_id in t or "outcome is unknown" in t or "Outcome unknown" in t for t in thread):
                    problems.append(f"approval {approval_id} in_doubt, not reported in thread {thread_ts}")
        for message in self.slack.messages.values():
            body = str(message.get("text") or "") + json.dumps(message.get("blocks") or "")
            if "Traceback" in body or 'File "' in body:
                problems.append(f"traceback in a chat message: {body[:300]}")
        return problems

    def audit_verify(self) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}
        env.update(DATABASE_URL=self.db_url, CHATOPS_AUDIT_KEY=AUDIT_KEY)
        argv = [str(Path(sys.executable).with_name("chatops")), "audit", "verify"]
        done = subprocess.run(argv, env=env, cwd=self.tmp, capture_output=True, text=True, timeout=120)
        return done.returncode, (done.stdout + done.stderr).strip()[-800:]

    def log_findings(self) -> dict[str, list[str]]:
        patterns = {
            "traceback": re.compile(r"Traceback \(most recent call last\)"),
            "never retrieved": re.compile(r"Task exception was never retrieved|was never awaited|Unclosed"),
            "error": re.compile(r"\bERROR\b|\bCRITICAL\b"),
            "stalled": re.compile(r"did not finish within"),
        }
        found: dict[str, list[str]] = defaultdict(list)
        for replica in self.replicas:
            for line in replica.log.read_text(errors="replace").splitlines():
                for name, pattern in patterns.items():
                    if pattern.search(line):
                        found[name].append(f"{replica.name}: {line[:300]}")
        return found

    # -------------------------------------------------------------- main
    async def send_all(self) -> None:
        """Start the conversations at the campaign's rate (Poisson) and wait until each is delivered."""
        senders = []
        for n in range(1, self.args.conversations + 1):
            senders.append(asyncio.create_task(self.converse(n)))
            await asyncio.sleep(self.rng.expovariate(self.args.rate))
            if n % 50 == 0:
                log(f"{n} conversations started; {len(self.answers())} answered")
        await asyncio.gather(*senders)
        log(f"all {self.args.conversations} delivered; chaos continues {self.args.tail}s")

    async def run(self) -> int:
        args = self.args
        self.create_schema()
        started = time.monotonic()
        try:
            async with (
                ChaosSlack() as slack,
                ScriptedModel() as model,
                SlowSmtp(delay=args.smtp_delay) as smtp,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
            ):
                self.slack, self.smtp, self.http = slack, smtp, http
                model.responder = Model(self.tag)
                env = self.env(slack, model, smtp)
                self.replicas = [Replica(f"replica-{i}", env, self.tmp, args.workers) for i in (1, 2)]
                self.replicas[0].spawn()
                assert await self.replicas[0].ready(http), self.replicas[0].log.read_text()[-3000:]
                self.replicas[1].spawn()
                assert await self.replicas[1].ready(http), self.replicas[1].log.read_text()[-3000:]
                log(f"replicas ready on ports {[r.port for r in self.replicas]}, schema {self.schema}")
                clicker = asyncio.create_task(self.clicker())
                if args.long_stop:
                    chaos = asyncio.create_task(self.long_stop(20, args.long_stop))
                else:
                    chaos = asyncio.create_task(self.chaos()) if not args.no_chaos else None
                await self.send_all()
                await asyncio.sleep(args.tail)
                self.chaos_on = False
                if chaos:
                    await chaos
                chaos_end = time.monotonic()
                log("chaos stopped; making sure both replicas run")
                for r in self.replicas:
                    while r.name in self.restarting:  # noqa: ASYNC110 - a restart in progress ends on its own
                        await asyncio.sleep(0.5)
                    if not r.alive():
                        r.spawn()
                        await r.ready(http)
                state = await self.settle(args.settle)
                settle_time = time.monotonic() - chaos_end
                clicker.cancel()
                problems = self.check(state)
                log(f"settled in {settle_time:.0f}s (bound {args.settle}s)")
                code, verify = await asyncio.to_thread(self.audit_verify)
                if code != 0:
                    problems.append(f"chatops audit verify exit {code}: {verify}")
                await asyncio.gather(*(r.stop() for r in self.replicas))
                logs = self.log_findings()
                self.report(state, problems, logs, verify, time.monotonic() - started, settle_time)
                return 1 if problems else 0
        finally:
            self.cont_all()
            for r in self.replicas:
                if r.alive():
                    r.kill_all()
            if not args.keep_schema:
                self.drop_schema()
            self.admin.dispose()

    def report(
        self, state: dict[str, Any], problems: list[str], logs: dict[str, list[str]], verify: str, wall: float, settle: float
    ) -> None:
        print("\n================ report ================")
        print(f"wall {wall:.0f}s, settle {settle:.0f}s; conversations {len(self.convs)}; deliveries "
              f"{sum(c.deliveries for c in self.convs.values())} (refused/unanswered {sum(c.refused for c in self.convs.values())})")  # fmt: skip
        print(f"faults: {dict(self.faults)}; fake Slack faulted calls: {dict(self.slack.faulted)}")
        print(f"replica starts: {[r.starts for r in self.replicas]}")
        print(
            f"clicks answered 200: {sum(self.clicks.values())} over {len(self.clicks)} approvals; failed POSTs {sum(self.click_fail.values())}"
        )
        print(f"runs {state['runs']}; inbox {state['inbox']}; approvals {state['approvals']}; outbox {state['outbox']}")
        print(f"SMTP: {len(self.smtp.attempts)} DATA attempts, {len(self.smtp.delivered)} delivered")
        print(f"outbox gave up: {state['outbox_gave_up'][:5]}")
        print(f"audit kinds: {state['audit_kinds']}")
        print(f"audit verify: {verify}")
        for name, lines in logs.items():
            print(f"log {name}: {len(lines)}")
            for line in lines[:8]:
                print("   ", line)
        print(f"PROBLEMS ({len(problems)}):")
        for p in problems:
            print("  -", p)
        (self.tmp / "faults.log").write_text("\n".join(self.fault_log) + "\n")


def campaign_arguments(doc: str | None, *, conversations: int, settle: float, smtp_delay: float) -> argparse.ArgumentParser:
    """The options every chaos campaign takes (this one's and `chaos_sqlite.py`'s), with its own defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=conversations)
    parser.add_argument("--rate", type=float, default=1.5, help="new conversations per second (Poisson)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stall", type=float, default=3)
    parser.add_argument("--lease", type=float, default=5)
    parser.add_argument("--tail", type=float, default=20, help="seconds of chaos after the last delivery")
    parser.add_argument("--settle", type=float, default=settle, help="seconds allowed to settle after the chaos")
    parser.add_argument("--smtp-delay", type=float, default=smtp_delay, help="each SMTP DATA takes up to this many seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-chaos", action="store_true")
    return parser


def main() -> None:
    parser = campaign_arguments(__doc__, conversations=300, settle=240, smtp_delay=3)
    parser.add_argument(
        "--long-stop", type=float, default=0, help="instead of the chaos: stop the processes inside a transaction once, this long"
    )
    parser.add_argument("--keep", type=Path, help="keep logs here")
    parser.add_argument("--keep-schema", action="store_true")
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    args = parser.parse_args()
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory() as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        code = asyncio.run(Campaign(args, Path(tmp)).run())
    sys.exit(code)


if __name__ == "__main__":
    main()
