"""`chatops serve` stops on SIGTERM/SIGINT within 10 s, exit 0, whatever the connections do; and
without a channel and a terminal it refuses to start. Real processes, real fakes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web

from tests.fakes.openai_server import ScriptedModel, calls, text
from tests.fakes.slack_api import FakeSlackApi
from tests.fakes.smtp_server import RawSmtp
from tests.slack_helpers import BOT_TOKEN, SIGNING_SECRET, card_message, click, encode, mention, signed

CHATOPS = [sys.executable, "-c", "from bot.cli import main; main()"]
CLOSED = "http://127.0.0.1:9"
STOP_BOUND = 10.0


class Serving:
    """A `chatops serve` process whose stderr is read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in self.lines if (m := regex.search(line))), None)

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: found() is not None or self._reader.done())
        match = found()
        assert match is not None, f"no line matching {pattern!r}:\n" + "\n".join(self.lines)
        return match

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, float]:
        """Send `sig`; (exit code, seconds it took)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        async with asyncio.timeout(STOP_BOUND + 20):
            code = await self.proc.wait()
            await self._reader
        return code, time.monotonic() - started

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


async def serve(tmp_path: Path, env: dict[str, str], *, stdin: int | None = None) -> Serving:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOPS_", "OPENAI_", "SLACK_", "FEISHU_"))}
    full.update({"CHATOPS_MODEL": "m", "OPENAI_API_KEY": "sk-stop-test-key", "OPENAI_BASE_URL": f"{CLOSED}/v1"})
    full.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}", "CHATOPS_PORT": "0", **env})
    proc = await asyncio.create_subprocess_exec(
        *CHATOPS, "serve", stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full, cwd=tmp_path
    )
    return Serving(proc)


@pytest.fixture
async def hanging_model() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A model endpoint that takes requests and never answers (until the test ends)."""
    called, release = asyncio.Event(), asyncio.Event()

    async def completions(_: web.Request) -> web.Response:
        called.set()
        await release.wait()
        return web.json_response({"error": {"message": "too late"}}, status=503)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", called
    release.set()
    await runner.cleanup()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stops_in_time_while_slack_socket_mode_is_unreachable(tmp_path, sig):
    env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_APP_TOKEN": "xapp-1-unreachable", "SLACK_API_URL": f"{CLOSED}/api/"}
    bot = await serve(tmp_path, env)
    await bot.wait_line(r"chatops started: Slack; not ready yet")
    await bot.wait_line(r"Socket Mode connect attempt 1 failed")
    code, took = await bot.stop(sig)
    assert code == 0 and took < STOP_BOUND, bot.stderr
    assert "Traceback" not in bot.stderr
    # Each process says who it is: the line was "SIGTERM received: stopping" from the front and each worker alike.
    assert f"front: {sig.name} received: stopping (pid {bot.proc.pid})" in bot.stderr, bot.stderr
    assert re.search(r"worker \d+: SIGTERM received: stopping \(pid \d+\)", bot.stderr), bot.stderr


async def test_stops_in_time_while_feishu_is_unreachable(tmp_path):
    env = {"FEISHU_APP_ID": "cli_unreachable", "FEISHU_APP_SECRET": "s3cret-unreachable", "FEISHU_DOMAIN": CLOSED}
    bot = await serve(tmp_path, env)
    await bot.wait_line(r"listening on http://")  # Feishu is being started (bot info retries, long connection)
    code, took = await bot.stop()
    assert code == 0 and took < STOP_BOUND, bot.stderr
    assert "Traceback" not in bot.stderr


async def test_stops_in_time_in_the_middle_of_a_model_call(tmp_path, hanging_model):
    model_url, called = hanging_model
    async with FakeSlackApi() as fake:
        env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_API_URL": fake.url}
        env |= {"OPENAI_BASE_URL": model_url, "CHATOPS_MODEL_TIMEOUT": "300"}
        bot = await serve(tmp_path, env)
        port = (await bot.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
        await bot.wait_line(r"chatops started: Slack; ready")
        body, content_type = encode(mention("list the leads"))
        async with aiohttp.ClientSession() as http:
            headers = {"Content-Type": content_type, **signed(body)}
            async with http.post(f"http://127.0.0.1:{port}/slack/events", data=body.encode(), headers=headers) as response:
                assert response.status == 200
        async with asyncio.timeout(30):
            await called.wait()  # the run is waiting on the model
        code, took = await bot.stop()
    assert code == 0 and took < STOP_BOUND, bot.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bot.db'}")
    with engine.connect() as conn:
        executing = conn.execute(sa.text("SELECT COUNT(*) FROM approval WHERE status = 'executing'")).scalar_one()
    engine.dispose()
    assert executing == 0


async def test_serve_without_a_channel_and_without_a_terminal_exits_with_one_line(tmp_path):
    bot = await serve(tmp_path, {}, stdin=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(60):
        code = await bot.proc.wait()
        await bot._reader
    assert code == 2
    assert len(bot.lines) == 1 and bot.lines[0].startswith("chatops: error: no chat channel is configured"), bot.stderr
    assert "SLACK_BOT_TOKEN" in bot.lines[0] and "FEISHU_APP_ID" in bot.lines[0]


async def test_json_logs_carry_the_sdks_lines_and_nothing_reaches_stdout(tmp_path):
    env = {"FEISHU_APP_ID": "cli_json", "FEISHU_APP_SECRET": "s3cret-json-logs", "FEISHU_DOMAIN": CLOSED}
    bot = await serve(tmp_path, {**env, "CHATOPS_LOG_FORMAT": "json"})
    await bot.wait_line(r'"logger": "Lark"')  # lark-oapi's own "connect failed" line, through our handler
    code, _ = await bot.stop()
    assert bot.proc.stdout is not None
    assert code == 0 and await bot.proc.stdout.read() == b""
    records = [json.loads(line) for line in bot.lines]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert "s3cret-json-logs" not in bot.stderr


async def test_stops_in_time_in_the_middle_of_an_execution_and_hands_its_run_back(tmp_path):
    """SIGTERM while an approved send_email hangs after DATA: exit 0 in time; the only approval left
    `executing` is the one whose tool was running (its lease runs out, then it is reported in doubt,
    never re-run); the run waits on it, held by no lease."""
    mail = {"to": "a@example.com", "subject": "weekly", "body": "report"}
    async with ScriptedModel() as model, FakeSlackApi() as fake, RawSmtp("hang_after_data") as smtp:
        model.responder = lambda body: text("done") if body["messages"][-1]["role"] == "tool" else calls(("send_email", mail))
        env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_API_URL": fake.url}
        env |= {"OPENAI_BASE_URL": model.url, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port)}
        env |= {"SMTP_SECURITY": "none", "SMTP_FROM": "bot@example.com", "SMTP_TIMEOUT": "120", "CHATOPS_TOOL_TIMEOUT": "300"}
        bot = await serve(tmp_path, env)
        port = (await bot.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
        await bot.wait_line(r"chatops started: Slack; ready")
        async with aiohttp.ClientSession() as http:
            for payload in (mention("mail the weekly report"), None):
                if payload is None:
                    await fake.wait_for("chat.postMessage", count=2)  # the progress line, then the card
                    payload = click(card_message(fake))
                body, content_type = encode(payload)
                headers = {"Content-Type": content_type, **signed(body)}
                async with http.post(f"http://127.0.0.1:{port}/slack/events", data=body.encode(), headers=headers) as response:
                    assert response.status == 200
        async with asyncio.timeout(30):
            await smtp.until(lambda s: len(s.messages) == 1)  # the mail is out; the server never confirms it
        code, took = await bot.stop()
        smtp.release()
    assert code == 0 and took < STOP_BOUND, bot.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bot.db'}")
    with engine.connect() as conn:
        executing = conn.execute(sa.text("SELECT tool_name FROM approval WHERE status = 'executing'")).scalars().all()
        runs = conn.execute(sa.text("SELECT status, lease_until FROM run")).all()
    engine.dispose()
    assert executing == ["send_email"]
    assert [status for status, _ in runs] == ["waiting"], runs  # paused on the approval, not held by a lease
