"""Chaos campaign, the default deployment: one `chatops serve --workers 2` (a front and two worker
processes) on one SQLite file, with the pieces of `chaos_pg.py` (the fake Slack with faults, the
scripted model, the SMTP server, the signed clicks, the checks), and faults injected from outside at
random moments (seeded):

* another process takes SQLite's write lock (`BEGIN IMMEDIATE` held 1-20 s);
* SIGKILL of a worker (the supervisor restarts it), SIGSTOP / SIGCONT of a worker for 5-40 s (a
  hung worker holding leases, maybe the write lock), SIGKILL of the whole `chatops serve` and a
  restart, half the time while another process takes the file for itself (`PRAGMA
  locking_mode=EXCLUSIVE` and a write, 1-10 s: readers are shut out too). Only then: while the bot's
  connections are open, SQLite refuses such a lock at once ("database is locked"), so it cannot be
  taken from a running bot;
* the fake Slack answering 429, 500 or nothing; the SMTP server hanging after DATA or dropping the
  connection there; the model endpoint hanging or answering 5xx.

Then, beside chaos_pg's checks (one final answer or one clear failure sentence per conversation,
nothing stuck, at most one execution and one mail per approval, every in_doubt reported, no
traceback in a chat, `chatops audit verify`): every delivery (event or click) is answered within
3 s at the load generator, and one that is not answered 200 is allowed only while the outside
process held the lock or the whole serve was down (then the redelivery must be answered); no
traceback in the logs.

    .venv/bin/python benchmarks/chaos_sqlite.py [--conversations 100] [--rate 1.5] [--seed 1] [--keep DIR]

Exit status 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.chaos_pg import (  # noqa: E402
    FINAL,
    Campaign,
    ChaosSlack,
    Model,
    Replica,
    SlowSmtp,
    campaign_arguments,
    children_of,
    log,
)
from bot.core import texts  # noqa: E402
from tests.fakes.openai_server import Reply, ScriptedModel, failure  # noqa: E402
from tests.fakes.smtp_server import DROP  # noqa: E402

# The clear one-sentence failures a conversation may end with instead of its answer.
FAILURES = (texts.MODEL_FAILED.source, texts.MODEL_BAD_RESPONSE.source)
ACK_BOUND = 3.0  # Slack's
NO_ANSWER = 599  # chaos_pg's status for a delivery not answered within 3 s, or refused

HOLDER = """
import sqlite3, sys, time
path, mode, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
db = sqlite3.connect(path, timeout=60, isolation_level=None)
if mode == "exclusive":
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("BEGIN IMMEDIATE")
db.execute("CREATE TABLE IF NOT EXISTS chaos_lock (at REAL)")
db.execute("INSERT INTO chaos_lock VALUES (?)", (time.time(),))
if mode == "exclusive":
    db.execute("COMMIT")  # the exclusive lock stays held until the connection closes
print("held", flush=True)
time.sleep(hold)
if mode != "exclusive":
    db.execute("COMMIT")
db.close()
print("released", flush=True)
"""


@dataclass
class FaultySmtp(SlowSmtp):
    """`mode`: ok, hang (the message is received, no answer to the final "." for 60 s) or drop."""

    mode: str = "ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.mode == "hang":
            assert isinstance(envelope.content, bytes)
            from tests.fakes.smtp_server import Received

            self.attempts.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, envelope.smtp_utf8))
            await asyncio.sleep(60)
            return "451 4.3.0 too late"
        if self.mode == "drop":
            self.script.appendleft(DROP)
        return await super().handle_DATA(server, session, envelope)


class FaultyModel(Model):
    """chaos_pg's model, plus `mode`: ok, hang (answers after 40 s, past CHATOPS_MODEL_TIMEOUT) or 5xx."""

    mode = "ok"

    def __call__(self, body: dict[str, Any]) -> Reply:
        if self.mode == "5xx":
            return failure(self.rng.choice([500, 502, 503]))
        reply = super().__call__(body)
        if self.mode == "hang":
            return Reply(content=reply.content, calls=reply.calls, delay=40)
        return reply


@dataclass
class Delivery:
    """One POST of the load generator: what, when, how it was answered."""

    what: str
    sent: float
    done: float
    status: int


@dataclass
class Windows:
    """Intervals (monotonic) of faults, some overlapping: when a 5xx or no answer is excused."""

    spans: list[tuple[str, float, float]] = field(default_factory=list)
    open: dict[int, tuple[str, float]] = field(default_factory=dict)

    tokens: Iterator[int] = field(default_factory=itertools.count)

    def start(self, kind: str) -> int:
        token = next(self.tokens)
        self.open[token] = (kind, time.monotonic())
        return token

    def end(self, token: int | None) -> None:
        if token in self.open:
            kind, started = self.open.pop(token)
            self.spans.append((kind, started, time.monotonic()))

    def all(self, kind: str) -> list[tuple[float, float]]:
        now = time.monotonic()
        return [(a, b) for k, a, b in self.spans if k == kind] + [(a, now) for k, a in self.open.values() if k == kind]

    def covering(self, sent: float, done: float, status: int, slack: float = 1.5) -> str | None:
        """The fault that excuses a delivery not answered 200 in time: the outside lock for any answer,
        a serve that was down (killed, restarting) only for no answer at all."""
        for kind in ("outside lock", "serve down"):
            if kind == "serve down" and status != NO_ANSWER:
                continue
            if any(start - slack <= done and sent <= end + slack for start, end in self.all(kind)):
                return kind
        return None


class SqliteCampaign(Campaign):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        args.postgres_url = "postgresql://unused@127.0.0.1:1/unused"
        super().__init__(args, tmp)
        self.admin.dispose()
        self.path = tmp / "chaos.db"
        for old in [*tmp.glob("chaos.db*"), tmp / "serve.log"]:  # a --keep directory used before: start afresh
            old.unlink(missing_ok=True)
        self.db_url = f"sqlite:///{self.path}"
        self.admin = sa.create_engine(self.db_url, connect_args={"timeout": 30})
        self.deliveries: list[Delivery] = []
        self.windows = Windows()
        self.serve_failed_starts = 0
        self.kills: list[float] = []  # when a worker or the whole serve was killed
        self.known: list[str] = []
        self.holders: set[asyncio.subprocess.Process] = set()

    def create_schema(self) -> None:
        pass  # `chatops serve` migrates the new file

    def drop_schema(self) -> None:
        pass

    def env(self, slack: Any, model: ScriptedModel, smtp: Any) -> dict[str, str]:
        env = super().env(slack, model, smtp)
        env.update(CHATOPS_DB_POOL_SIZE="10", SMTP_TIMEOUT="8", CHATOPS_TOOL_TIMEOUT="15")
        return env

    # -------------------------------------------------------------- deliveries, timed
    async def post(self, url: str, payload: dict[str, Any], retry: int = 0) -> int:
        sent = time.monotonic()
        status = await super().post(url, payload, retry)
        self.deliveries.append(Delivery(str(payload.get("type")), sent, time.monotonic(), status))
        return status

    # -------------------------------------------------------------- faults
    @property
    def serve(self) -> Replica:
        return self.replicas[0]

    async def hold_lock(self, mode: str, hold: float) -> bool:
        """Another process takes the lock (`immediate`: the write lock; `exclusive`: the whole file) for `hold` s."""
        window = None
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, str(self.path), mode, f"{hold:.2f}", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.holders.add(holder)
        try:
            assert holder.stdout is not None and holder.stderr is not None
            if (await holder.stdout.readline()).strip() != b"held":
                why = (await holder.stderr.read()).decode(errors="replace").strip().splitlines()[-1:]
                log(f"lock holder ({mode}) could not take the lock: {why}")
                return False
            window = self.windows.start("outside lock")
            self.note(f"lock-{mode}", f"{hold:.1f}s")
            await holder.wait()
            return True
        finally:
            self.windows.end(window)
            self.holders.discard(holder)

    async def fault_lock(self) -> None:
        hold = self.rng.uniform(1, 20)
        if not self.holders:  # one other process at a time: back to back, they held the lock for minutes
            await self.hold_lock("immediate", hold)

    def workers(self) -> list[int]:
        return children_of(self.serve.proc.pid) if self.serve.alive() else []  # type: ignore[union-attr]

    async def fault_kill_worker(self) -> None:
        pid = self.serve.kill_worker()
        if pid:
            self.kills.append(time.monotonic())
            self.note("kill-worker", str(pid))

    async def fault_stop_worker(self) -> None:
        kids = [p for p in self.workers() if p not in self.stopped]
        if not kids:
            return
        pid, hold = self.rng.choice(kids), self.rng.uniform(5, 40)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            self.stopped.add(pid)
        window = self.windows.start("worker stopped")  # no excuse: reported beside the acks
        self.note("stop-worker", f"{pid} for {hold:.1f}s")
        await asyncio.sleep(hold)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.stopped.discard(pid)
        self.windows.end(window)

    async def fault_kill_serve(self) -> None:
        if "serve" in self.restarting or not self.serve.alive():
            return
        self.restarting.add("serve")
        window = self.windows.start("serve down")
        try:
            self.serve.kill_all()
            self.kills.append(time.monotonic())
            self.note("kill-serve", "")
            exclusive = None
            if self.rng.random() < 0.5 and not self.holders:  # the file taken for itself (readers shut out too)
                exclusive = asyncio.create_task(self.hold_lock("exclusive", self.rng.uniform(1, 10)))
            await asyncio.sleep(self.rng.uniform(0.5, 4))
            self.serve.spawn()
            while not await self.serve.ready(self.http):
                code = self.serve.proc.poll() if self.serve.proc else None
                log(f"serve not ready after restart (exit {code}): {self.serve.log.read_text()[-300:]!r}; starting it again")
                self.serve_failed_starts += 1
                self.serve.spawn()
            if exclusive is not None:
                await exclusive
        finally:
            self.windows.end(window)
            self.restarting.discard("serve")

    async def fault_smtp(self) -> None:
        mode, hold = self.rng.choice(["hang", "drop"]), self.rng.uniform(3, 15)
        self.smtp.mode = mode  # type: ignore[attr-defined]
        self.note("smtp", f"{mode} for {hold:.1f}s")
        await asyncio.sleep(hold)
        self.smtp.mode = "ok"  # type: ignore[attr-defined]

    async def fault_model(self) -> None:
        mode, hold = self.rng.choice(["hang", "5xx"]), self.rng.uniform(2, 8)
        self.model.mode = mode
        self.note("model", f"{mode} for {hold:.1f}s")
        await asyncio.sleep(hold)
        self.model.mode = "ok"

    CHAOS_PAUSE = (2.0, 6.0)

    def fault_kinds(self) -> list[tuple[Callable[[], Awaitable[None]], int]]:
        return [
            (self.fault_lock, 3),
            (self.fault_kill_worker, 2),
            (self.fault_stop_worker, 2),
            (self.fault_kill_serve, 1),
            (self.fault_slack, 2),
            (self.fault_smtp, 2),
            (self.fault_model, 1),
        ]

    def cont_all(self) -> None:
        super().cont_all()
        for holder in list(self.holders):
            with contextlib.suppress(ProcessLookupError):
                holder.kill()
        self.holders.clear()

    # -------------------------------------------------------------- checks
    def answers(self) -> dict[int, list[dict[str, Any]]]:
        by_thread = {c.ts: n for n, c in self.convs.items()}
        found: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for message in list(self.slack.messages.values()):
            body = str(message.get("text") or "")
            m = FINAL.search(body)
            if m:
                found[int(m.group(1))].append(message)
            elif body.startswith(FAILURES) and message.get("thread_ts") in by_thread:
                found[by_thread[message["thread_ts"]]].append(message)
        return found

    SQL_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    SQL_SUBJECT, SQL_THREAD_TS = "json_extract(args, '$.subject')", "json_extract(thread, '$.thread_ts')"

    def enter_schema(self, conn: sa.Connection) -> None:
        pass  # one file, no schema

    def died_before_its_mark(self, n: int) -> bool:
        """A second copy of conversation n's answer, sent (after the job's claim ran out) because the process
        that posted the first was killed before its "sent" mark landed: held back by the outside lock, or
        the process stopped right after its post (README: at least once, never lost)."""
        root = self.convs[n].ts
        posts = sorted(c.at for c in self.slack.calls if c.status == 200 and c.params.get("thread_ts") == root and (
            c.method == "chat.startStream" or (c.method == "chat.postMessage" and self._is_answer(str(c.params.get("text") or ""), n))))  # fmt: skip
        if len(posts) != 2:
            return False
        first, second = posts
        held = sorted(self.windows.all("outside lock") + self.windows.all("worker stopped"))
        reach = first  # how far, from the first post on, the lock or a stop kept the mark from landing
        for a, b in held:
            if a <= reach + 1.0:
                reach = max(reach, b)
        return any(first < k < second and k <= reach for k in self.kills)

    @staticmethod
    def _is_answer(body: str, n: int) -> bool:
        m = FINAL.search(body)
        return (m is not None and int(m.group(1)) == n) or body.startswith(FAILURES)

    def check(self, state: dict[str, Any]) -> list[str]:
        problems = []
        for problem in super().check(state):
            twice = re.match(r"conversation (\d+): 2 final answers", problem)
            if twice and self.died_before_its_mark(int(twice.group(1))):
                self.known.append(problem[:120])
            else:
                problems.append(problem)
        for n, conv in sorted(self.convs.items()):
            if conv.acked_at is None:
                problems.append(f"conversation {n}: never acked")
        for d in self.deliveries:
            if d.status == 200 and d.done - d.sent <= ACK_BOUND:
                continue
            excuse = self.windows.covering(d.sent, d.done, d.status)
            if excuse is None:
                problems.append(
                    f"{d.what} answered {d.status} after {d.done - d.sent:.2f}s at +{d.sent - self.t0:.1f}s, no excuse"
                )
        return problems

    # -------------------------------------------------------------- main
    async def run(self) -> int:
        args = self.args
        started = self.t0 = time.monotonic()
        try:
            async with (
                ChaosSlack() as slack,
                ScriptedModel() as model,
                FaultySmtp(delay=args.smtp_delay) as smtp,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
            ):
                self.slack, self.smtp, self.http = slack, smtp, http
                self.model = FaultyModel(self.tag)
                model.responder = self.model
                self.replicas = [Replica("serve", self.env(slack, model, smtp), self.tmp, args.workers)]
                self.serve.spawn()
                assert await self.serve.ready(http), self.serve.log.read_text()[-3000:]
                log(f"serve ready on port {self.serve.port}, database {self.path}")
                clicker = asyncio.create_task(self.clicker())
                chaos = asyncio.create_task(self.chaos()) if not args.no_chaos else None
                await self.send_all()
                await asyncio.sleep(args.tail)
                self.chaos_on = False
                if chaos:
                    await chaos
                chaos_end = time.monotonic()
                log("chaos stopped; making sure serve runs")
                while "serve" in self.restarting:  # noqa: ASYNC110 - a restart in progress ends on its own
                    await asyncio.sleep(0.5)
                if not self.serve.alive():
                    self.serve.spawn()
                    await self.serve.ready(http)
                state = await self.settle(args.settle)
                settle_time = time.monotonic() - chaos_end
                clicker.cancel()
                problems = self.check(state)
                log(f"settled in {settle_time:.0f}s (bound {args.settle}s)")
                code, verify = await asyncio.to_thread(self.audit_verify)
                if code != 0:
                    problems.append(f"chatops audit verify exit {code}: {verify}")
                await self.serve.stop()
                logs = self.log_findings()
                problems += [f"log: {line}" for line in logs.get("traceback", [])[:5]]
                self.report(state, problems, logs, verify, time.monotonic() - started, settle_time)
                self.report_acks()
                self.dump_calls()
                return 1 if problems else 0
        finally:
            self.cont_all()
            if self.replicas and self.serve.alive():
                self.serve.kill_all()
            self.admin.dispose()

    def report_acks(self) -> None:
        ok = sorted(d.done - d.sent for d in self.deliveries if d.status == 200)
        refused = [d for d in self.deliveries if d.status != 200]
        excused: dict[str, int] = defaultdict(int)
        for d in refused:
            excused[self.windows.covering(d.sent, d.done, d.status) or "none"] += 1
        if ok:
            p = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))]  # noqa: E731
            print(f"acks 200: {len(ok)}, p50 {p(0.5) * 1000:.0f} ms, p99 {p(0.99) * 1000:.0f} ms, max {ok[-1] * 1000:.0f} ms")
        stopped = self.windows.all("worker stopped")
        print(
            f"acks 200 while a worker was stopped: {sum(1 for d in self.deliveries if d.status == 200 and any(a <= d.sent <= b for a, b in stopped))}"
        )
        print(f"not 200: {len(refused)} by status {dict(_count(d.status for d in refused))}, by excuse {dict(excused)}")
        print(f"outside lock windows: {len(self.windows.all('outside lock'))}, serve down: {len(self.windows.all('serve down'))}")
        print(f"serve starts that failed (started again by the campaign): {self.serve_failed_starts}")
        print(f"KNOWN, documented (a process killed between its post and its sent mark): {self.known}")

    def dump_calls(self) -> None:
        """The fake Slack's calls, one JSON line each (time since the start, method, status, text), for tracing."""
        with open(self.tmp / "slack_calls.jsonl", "w") as out:
            for c in self.slack.calls:
                p = c.params
                wall = time.time() - (time.monotonic() - c.at)
                row = {"t": round(c.at - self.t0, 3), "wall": time.strftime("%H:%M:%S", time.localtime(wall)) + f"{wall % 1:.3f}"[1:], "method": c.method, "status": c.status, "channel": p.get("channel"),
                       "thread_ts": p.get("thread_ts"), "ts": p.get("ts"), "text": str(p.get("text") or "")[:80]}  # fmt: skip
                out.write(json.dumps(row) + "\n")
        with open(self.tmp / "deliveries.jsonl", "w") as out:
            for d in self.deliveries:
                row = {"t": round(d.sent - self.t0, 3), "took": round(d.done - d.sent, 3), "what": d.what, "status": d.status}
                out.write(json.dumps(row) + "\n")


def _count(items: Any) -> dict[Any, int]:
    out: dict[Any, int] = defaultdict(int)
    for item in items:
        out[item] += 1
    return out


def main() -> None:
    parser = campaign_arguments(__doc__, conversations=100, settle=150, smtp_delay=2)
    parser.add_argument("--keep", type=Path, help="keep the database and logs here")
    args = parser.parse_args()
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory() as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        code = asyncio.run(SqliteCampaign(args, Path(tmp)).run())
    sys.exit(code)


if __name__ == "__main__":
    main()
