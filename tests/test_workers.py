"""`chatops serve --workers 2`: the front acks and signals, worker processes do the work. Real
processes against fake Slack, the scripted model and a fake SMTP server, on SQLite and PostgreSQL.

The sweep interval is set far beyond the tests' time bounds, so a run that starts proves the
wake-up path (local socket on SQLite, NOTIFY on PostgreSQL), not the periodic sweep.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web

from bot.cli_workers import WORKER_NICENESS
from bot.core.sweeper import Share
from bot.supervisor import Workers, WorkersReadiness
from tests.fakes.openai_server import Reply, ScriptedModel, calls, text
from tests.fakes.slack_api import TEAM_ID, FakeSlackApi
from tests.fakes.smtp_server import FakeSmtp
from tests.slack_helpers import BOT_TOKEN, CHANNEL, SIGNING_SECRET, card_message, click, encode, mention, next_ts, signed
from tests.test_ops_stop import STOP_BOUND, Serving

CHATOPS = [sys.executable, "-c", "from bot.cli import main; main()"]
MAIL = {"to": "a@example.com", "subject": "weekly", "body": "report"}
SENT = "mail sent"


def mail_then_answer(body: dict[str, Any]) -> Reply:
    return text(SENT) if body["messages"][-1]["role"] == "tool" else calls(("send_email", MAIL))


class GatedModel(ScriptedModel):
    """The scripted model, except that its first request waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__(responder=mail_then_answer)
        self.held, self.release = asyncio.Event(), asyncio.Event()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if not self.held.is_set():
            self.held.set()
            await self.release.wait()
        return await super()._completions(request)


def sync_url(db_url: str) -> sa.URL:
    url = sa.make_url(db_url)
    return url if url.get_backend_name() == "sqlite" else url.set(drivername="postgresql+psycopg")


def query(db_url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:
            return list(conn.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


class Bot:
    """`chatops serve --workers N` with Slack over HTTP, and what it logged."""

    def __init__(self, serving: Serving, fake: FakeSlackApi, workers: int) -> None:
        self.serving, self.fake, self.workers = serving, fake, workers
        self.port = 0

    async def ready(self) -> None:
        self.port = int((await self.serving.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
        await self.serving.wait_line(r"chatops started: Slack; ready")
        for index in range(self.workers):
            await self.serving.wait_line(rf"worker {index} ready")

    def worker_pids(self) -> set[int]:
        return {int(m.group(1)) for line in self.serving.lines if (m := re.search(r"worker \d started \(pid (\d+)\)", line))}

    async def send(self, payload: dict[str, Any]) -> None:
        body, content_type = encode(payload)
        async with aiohttp.ClientSession() as http:
            headers = {"Content-Type": content_type, **signed(body)}
            url = f"http://127.0.0.1:{self.port}/slack/events"
            async with http.post(url, data=body.encode(), headers=headers) as response:
                assert response.status == 200

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}{path}") as response:
            return response.status, await response.text()

    async def answered(self, text_: str, count: int = 1) -> None:
        """Wait until `count` Slack messages say `text_`."""
        messages = self.fake.messages
        await self._until(lambda: sum(m.get("text") == text_ for m in messages.values()) >= count, f"no {text_!r}")

    async def approve_the_card(self) -> None:
        await self._until(lambda: any(m.get("blocks") for m in self.fake.messages.values()), "no card")
        await self.send(click(card_message(self.fake)))

    async def _until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(60), self.fake._changed:
                await self.fake._changed.wait_for(condition)
        except TimeoutError:
            raise AssertionError(f"{what}:\n{self.serving.stderr[-6000:]}") from None

    async def stop(self) -> None:
        pids = self.worker_pids()
        code, took = await self.serving.stop()
        assert code == 0 and took < STOP_BOUND, self.serving.stderr
        assert not [pid for pid in pids if alive(pid)], "a worker outlived `chatops serve`"
        assert "Traceback" not in self.serving.stderr, self.serving.stderr


async def wait_lines(serving: Serving, pattern: str, count: int) -> None:
    """Wait until `count` stderr lines match `pattern`."""
    regex = re.compile(pattern)

    def seen() -> int:
        return sum(1 for line in serving.lines if regex.search(line))

    async with asyncio.timeout(60), serving._changed:
        await serving._changed.wait_for(lambda: seen() >= count or serving._reader.done())
    assert seen() >= count, f"fewer than {count} lines matching {pattern!r}:\n{serving.stderr}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSmtp]:
    async with FakeSmtp() as server:
        yield server


async def start_bot(
    tmp_path: Path,
    db_url: str,
    model_url: str,
    fake: FakeSlackApi,
    smtp: FakeSmtp,
    workers: int = 2,
    ready: bool = True,
    **env: str,
) -> Bot:
    """`chatops serve --workers N`, started; ready (`ready=True`: every worker said so) or still starting."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOPS_", "OPENAI_", "SLACK_", "FEISHU_", "PROMETHEUS_"))}
    full |= {"CHATOPS_MODEL": "m", "OPENAI_API_KEY": "sk-workers-test", "OPENAI_BASE_URL": model_url}
    full |= {"DATABASE_URL": db_url, "CHATOPS_PORT": "0", "CHATOPS_SWEEP_INTERVAL": "600"}
    full |= {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_API_URL": fake.url}
    full |= {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port), "SMTP_SECURITY": "none", "SMTP_FROM": "bot@example.com"}
    proc = await asyncio.create_subprocess_exec(
        *CHATOPS, "serve", "--workers", str(workers), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=full | env, cwd=tmp_path,
    )  # fmt: skip
    bot = Bot(Serving(proc), fake, workers)
    if ready:
        await bot.ready()
    return bot


def owner_pid(owner: str) -> int:
    return int(owner.split(":")[-2])  # replica ids are host:pid:random


async def test_a_message_runs_in_a_worker_card_click_one_execution_reply(tmp_path, db_url, smtp):
    async with ScriptedModel(responder=mail_then_answer) as model, FakeSlackApi() as fake:
        bot = await start_bot(tmp_path, db_url, model.url, fake, smtp)
        try:
            await bot.send(mention("mail the weekly report"))
            await bot.approve_the_card()
            await bot.answered(SENT)
            owners = {owner_pid(row[0]) for row in query(db_url, "SELECT owner FROM run")}
            assert owners <= bot.worker_pids() and bot.serving.proc.pid not in owners
            front_niceness = os.getpriority(os.PRIO_PROCESS, bot.serving.proc.pid)
            assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in bot.worker_pids()} == {front_niceness + WORKER_NICENESS}
            loops = [m.group(1) for line in bot.serving.lines if (m := re.search(r"ready \(event loop: (\w+)\)", line))]
            assert loops == ["uvloop"] * 3, loops  # the front and both workers, on the default CHATOPS_EVENT_LOOP
            status, page = await bot.get("/metrics")  # the front shows the workers' core metrics, and its own
            assert status == 200 and re.search(r'chatops_runs_total\{outcome="done"\} 1\.0', page), page
            assert re.search(r'chatops_acks_total\{platform="slack",status="ok"\} [1-9]', page), page
            ready = await bot.get("/readyz")
            assert ready[0] == 200, ready
        finally:
            await bot.stop()
    assert len(smtp.delivered) == 1
    statuses = [row[0] for row in query(db_url, "SELECT status FROM approval")]
    assert statuses == ["succeeded"]


async def test_a_worker_killed_mid_run_is_restarted_and_the_turn_finishes_once(tmp_path, db_url, smtp):
    async with GatedModel() as model, FakeSlackApi() as fake:
        env = {"CHATOPS_LEASE_SECONDS": "2", "CHATOPS_SWEEP_INTERVAL": "0.5"}
        bot = await start_bot(tmp_path, db_url, model.url, fake, smtp, **env)
        try:
            await bot.send(mention("mail the weekly report"))
            async with asyncio.timeout(60):
                await model.held.wait()  # a worker is in the model call of the run
            [(owner,)] = query(db_url, "SELECT owner FROM run WHERE status = 'running'")
            victim = owner_pid(owner)
            os.kill(victim, signal.SIGKILL)
            await bot.serving.wait_line(rf"worker \d \(pid {victim}\) exited with -9; restarting")
            model.release.set()
            await wait_lines(bot.serving, r"worker \d started \(pid \d+\)", 3)
            await bot.approve_the_card()  # the run was taken over and went on
            await bot.answered(SENT)
        finally:
            model.release.set()
            await bot.stop()
    assert any("outlived its lease: taken over" in line for line in bot.serving.lines), bot.serving.stderr
    assert len(smtp.delivered) == 1
    assert [row[0] for row in query(db_url, "SELECT status FROM approval")] == ["succeeded"]
    assert [row[0] for row in query(db_url, "SELECT status FROM run")] == ["done"]


async def test_a_message_in_a_dead_workers_share_is_started_by_another_worker_before_any_sweep(tmp_path, db_url, smtp):
    """Worker 0 is killed and a message of its share (its conversation key hashes to 0) arrives before
    its replacement is ready; the periodic sweep is 10 minutes away. The front wakes the workers while
    one is missing, so the other one, idle, starts the message once it has waited the share's grace."""
    async with ScriptedModel(responder=lambda body: text(SENT)) as model, FakeSlackApi() as fake:
        bot = await start_bot(tmp_path, db_url, model.url, fake, smtp)
        try:
            pids = {
                int(m[1]): int(m[2]) for line in bot.serving.lines if (m := re.search(r"worker (\d) started \(pid (\d+)\)", line))
            }
            os.kill(pids[0], signal.SIGKILL)
            await bot.serving.wait_line(rf"worker 0 \(pid {pids[0]}\) exited with -9")
            ts = next(ts for ts in iter(next_ts, None) if Share(0, 2).holds(f"slack:{TEAM_ID}:{CHANNEL}:{ts}"))
            await bot.send(mention("hello", ts=ts))
            await bot.answered(SENT)
            assert {owner_pid(row[0]) for row in query(db_url, "SELECT owner FROM run")} == {pids[1]}
        finally:
            await bot.stop()


async def test_notify_wakes_the_workers_and_a_terminated_listen_connection_comes_back(tmp_path, postgres_url, smtp):
    async with ScriptedModel(responder=lambda body: text(SENT)) as model, FakeSlackApi() as fake:
        bot = await start_bot(tmp_path, postgres_url, model.url, fake, smtp)
        try:
            await bot.send(mention("first"))
            await bot.answered(SENT)
            application = sa.make_url(postgres_url).query["application_name"]
            ended = query(
                postgres_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a AND query ILIKE 'LISTEN%'",
                a=application,
            )
            assert len(ended) == 2, ended  # one LISTEN connection per worker
            await wait_lines(bot.serving, r"the LISTEN connection failed", 2)
            await wait_lines(bot.serving, r"listening for work again", 2)
            await bot.send(mention("second"))
            await bot.answered(SENT, count=2)
        finally:
            await bot.stop()


async def test_with_no_worker_the_front_does_the_work_itself(tmp_path, sqlite_url, smtp):
    async with ScriptedModel(responder=lambda body: text(SENT)) as model, FakeSlackApi() as fake:
        bot = await start_bot(tmp_path, sqlite_url, model.url, fake, smtp, workers=0)
        try:
            await bot.send(mention("hello"))
            await bot.answered(SENT)
            assert {owner_pid(row[0]) for row in query(sqlite_url, "SELECT owner FROM run")} == {bot.serving.proc.pid}
            assert not bot.worker_pids()
        finally:
            await bot.stop()


async def test_readiness_says_so_when_no_worker_is_alive():
    assert await WorkersReadiness(Workers(0, [])).not_ready() == ["no worker process is alive"]


_SLOW_WORKER = """
import os, sys
ready = int(sys.argv[sys.argv.index("--ready-fd") + 1])
with open(sys.argv[1]) as go:  # a FIFO: its start-up lasts until the test opens the other end
    go.read()
os.write(ready, b"r")
os.close(ready)
sys.stdin.read()  # until the supervisor goes
"""


async def test_readiness_waits_until_a_live_worker_said_it_is_ready(tmp_path):
    """`/readyz` is not ready while the only worker is still starting (a deploy would send it traffic
    no process works on), ready once it said so over its pipe, and not ready once it died."""
    go = tmp_path / "go"
    os.mkfifo(go)
    workers = Workers(1, [str(go)], command=[sys.executable, "-c", _SLOW_WORKER])
    readiness = WorkersReadiness(workers)
    await workers.start()
    try:
        assert await readiness.not_ready() == ["no worker process is ready yet"]
        await asyncio.to_thread(go.write_text, "")  # the worker's start-up ends
        async with asyncio.timeout(30):
            while await readiness.not_ready():
                await asyncio.sleep(0.01)
        worker = workers.procs[0]
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        assert await readiness.not_ready() != []
    finally:
        await workers.stop(5)


async def test_two_serves_share_one_postgres_and_execute_once(tmp_path, postgres_url, smtp):
    """Two `chatops serve --workers 1` (two machines) on one database: the message reaches one front,
    the click the other; the approval is executed once and the answer posted once."""
    async with ScriptedModel(responder=mail_then_answer) as model, FakeSlackApi() as fake:
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        key = {"CHATOPS_AUDIT_KEY": "one-audit-key-shared-by-every-replica-0123456789"}
        first = await start_bot(tmp_path / "a", postgres_url, model.url, fake, smtp, workers=1, **key)
        second = await start_bot(tmp_path / "b", postgres_url, model.url, fake, smtp, workers=1, **key)
        try:
            await first.send(mention("mail the weekly report"))
            await second.approve_the_card()
            await second.answered(SENT)
        finally:
            await asyncio.gather(first.stop(), second.stop())
    assert len(smtp.delivered) == 1
    assert [row[0] for row in query(postgres_url, "SELECT status FROM approval")] == ["succeeded"]
    assert sum(m.get("text") == SENT for m in fake.messages.values()) == 1


@pytest.mark.parametrize(
    ("database_url", "env", "args", "expected"),
    [
        ("sqlite:///x.db", {}, [], "cpus"),  # the workers let the front's acks take the write lock first
        ("sqlite:///x.db", {"CHATOPS_WORKERS": "0"}, [], 0),
        ("sqlite:///x.db", {}, ["--workers", "2"], 2),
        ("sqlite:///x.db", {"CHATOPS_WORKERS": "3"}, [], 3),
        ("postgresql://u@h/db", {}, [], "cpus"),
        ("postgresql://u@h/db", {"CHATOPS_WORKERS": "0"}, [], 0),
    ],
)
def test_the_default_number_of_workers_follows_the_database(database_url, env, args, expected):
    from bot.cli import _worker_count, build_parser
    from tests.conftest import make_settings

    settings = make_settings(
        "http://127.0.0.1:9/v1", database_url, SLACK_BOT_TOKEN="xoxb-1", SLACK_SIGNING_SECRET="s" * 32, **env
    )
    count = _worker_count(build_parser().parse_args(["serve", *args]), settings)
    assert count == (len(os.sched_getaffinity(0)) if expected == "cpus" else expected)
