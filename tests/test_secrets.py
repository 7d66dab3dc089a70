"""Canary secrets: planted in the configuration, in user messages and in tool errors; after a full
conversation at DEBUG, none appears in log lines, audit rows, model requests or chat messages."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging

import pytest
import sqlalchemy as sa

from bot.logsetup import redacting_handler
from storage.models import AuditEvent, Conversation
from storage.redact import Redactor
from tests.fakes.openai_server import calls, text
from tests.slack_helpers import fake_slack_fixture, slack_bot_fixture
from tests.test_core_agent import approval_ids
from tools.context import ToolContext
from tools.errors import ToolError
from tools.registry import Toolset

__all__ = ["fake_slack_fixture", "slack_bot_fixture"]

CANARIES = {
    "OPENAI_API_KEY": "sk-canary-openai-7f3a9c2e1d0b4a68",
    "SLACK_SIGNING_SECRET": "canary-slack-signing-5b1c9e",
    "FEISHU_APP_SECRET": "canary-feishu-secret-8d2f4a",
    "FEISHU_ENCRYPT_KEY": "canary-feishu-encrypt-1e7b3c",
    "SMTP_PASSWORD": "canary-smtp-pass-6a0d2f",
    "HUBSPOT_TOKEN": "canary-hubspot-token-3c9e1b",
    "FEISHU_WEBHOOK_SECRET": "canary-robot-secret-4f8a2d",
}
PASTED = ["xoxb-1234567890-canary-pasted-token", "sk-proj-canarypastedkey1234567890"]


def leaky_toolset() -> Toolset:
    toolset = Toolset("leaky")

    @toolset.tool(read_only=True)
    async def check_connection(ctx: ToolContext, service: str) -> str:
        """Check a connection.

        Args:
            service: Which service.
        """
        secret = ctx.settings.smtp_password.get_secret_value()  # a careless tool puts a secret in its error
        raise ToolError(f"login failed for {service} with password {secret} and token {CANARIES['HUBSPOT_TOKEN']}")

    @toolset.tool()
    async def store_note(ctx: ToolContext, note: str) -> str:
        """Store a note.

        Args:
            note: The note.
        """
        return f"stored: {note} (auth {ctx.settings.openai_api_key.get_secret_value()})"

    return toolset


async def test_no_canary_reaches_logs_audit_model_or_chat(terminal_bot, model, sqlite_url):
    stream = io.StringIO()
    env = {**CANARIES, "FEISHU_APP_ID": "cli_canary_app", "SMTP_USERNAME": "bot"}
    model.script(
        calls(("check_connection", {"service": "smtp"}), ("store_note", {"note": f"remember {PASTED[0]}"})),
        text(f"Done. (echo: {CANARIES['FEISHU_APP_SECRET']} {PASTED[1]})"),
    )
    bot = await terminal_bot(toolsets=[leaky_toolset()], CHATOPS_LOG_LEVEL="DEBUG", **env)
    settings = bot.app.settings
    handler = redacting_handler(stream, Redactor(settings.secret_values()))  # what `chatops serve` installs
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("chatops.test").debug("settings are %s and key %s", settings, CANARIES["OPENAI_API_KEY"])
        try:
            raise RuntimeError(f"boom {CANARIES['SMTP_PASSWORD']}")
        except RuntimeError:
            logging.getLogger("chatops.test").exception("a failure with a secret in it")
        await bot.say(f"here is my token {PASTED[0]} and key {PASTED[1]}; check smtp and store a note")
        (approval_id,) = approval_ids(bot.transcript())
        await bot.say(f"approve {approval_id}")
    finally:
        logging.getLogger().removeHandler(handler)

    async with bot.app.ctx.db.transaction() as session:
        audit = [
            json.dumps(r.model_dump(mode="json"), ensure_ascii=False)
            for r in (await session.execute(sa.select(AuditEvent))).scalars()
        ]
        memory = [json.dumps(c.messages, ensure_ascii=False) for c in (await session.execute(sa.select(Conversation))).scalars()]
    sinks = {
        "logs": stream.getvalue(),
        "audit": "\n".join(audit),
        "memory": "\n".join(memory),
        "model requests": json.dumps(model.requests, ensure_ascii=False),
        "chat": bot.transcript(),
    }
    assert "a failure with a secret in it" in sinks["logs"] and "RuntimeError" in sinks["logs"]
    assert "[REDACTED]" in sinks["model requests"] and "[REDACTED]" in sinks["chat"]
    leaks = [(sink, secret) for sink, content in sinks.items() for secret in [*CANARIES.values(), *PASTED] if secret in content]
    assert leaks == []


# ---------------------------------------------------------------------- every secret pasted in a DM


URL_CANARIES = {
    "FEISHU_WEBHOOK_URL": "https://open.feishu.cn/open-apis/bot/v2/hook/7c1e9a52-canary-robot-hook-token",
    "HUBSPOT_BASE_URL": "https://hsuser:canary-url-pass-91f3@api.hubapi.com",
    "CHATOPS_AUDIT_KEY": "canary-audit-key-0f4b8e2a9c6d1357fedcba9876543210",
}
ROBOT_TOKEN = "7c1e9a52-canary-robot-hook-token"
DB_PASSWORD = "canary-db-pass-5e2d8b"


def _with_password(url: str) -> str:
    return sa.make_url(url).set(password=DB_PASSWORD).render_as_string(hide_password=False)


def _every_table(url: str) -> str:
    """Every column of every row of every table, as text."""
    engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
    dump = []
    try:
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    dump.append(f"{table}: {json.dumps([str(v) for v in row], ensure_ascii=False)}")
    finally:
        engine.dispose()
    return "\n".join(dump)


async def test_every_configured_secret_pasted_in_a_dm_reaches_no_sink(slack_bot, model, postgres_url, monkeypatch):
    from bot.cli import run as chatops
    from tests.slack_helpers import BOT_TOKEN, SIGNING_SECRET, dm

    database_url = _with_password(postgres_url)
    configured = {k: v for k, v in CANARIES.items() if k != "SLACK_SIGNING_SECRET"}  # Slack signs with SIGNING_SECRET
    env = {**configured, **URL_CANARIES, "FEISHU_APP_ID": "cli_canary_app", "SMTP_USERNAME": "bot"}
    secrets = [*configured.values(), *URL_CANARIES.values(), ROBOT_TOKEN, DB_PASSWORD, BOT_TOKEN, SIGNING_SECRET]
    pasted = " ".join([*secrets, database_url, f"postgresql://postgres:{DB_PASSWORD}@db.internal/prod"])
    model.script(text(f"Noted: {pasted}"))
    stream = io.StringIO()
    bot = await slack_bot(database_url=database_url, env={**env, "CHATOPS_LOG_LEVEL": "DEBUG"})
    handler = redacting_handler(stream, Redactor(bot.app.settings.secret_values()))  # what `chatops serve` installs
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("chatops.test").info("the user said: %s", pasted)
        assert (await bot.send(dm(f"my credentials: {pasted}")))[0] == 200
        await bot.settle()
        await bot.app.ctx.audit.chain(bot.app.ctx.db)
    finally:
        logging.getLogger().removeHandler(handler)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", URL_CANARIES["CHATOPS_AUDIT_KEY"])
    export = io.StringIO()
    with contextlib.redirect_stdout(export):
        assert await asyncio.to_thread(chatops, ["audit", "export"]) == 0
    sinks = {
        "model requests": json.dumps(model.requests, ensure_ascii=False),
        "slack posts": json.dumps([c.params for c in bot.fake.calls], ensure_ascii=False),
        "audit export": export.getvalue(),
        "log": stream.getvalue(),
        "tables": _every_table(postgres_url),
    }
    assert "my credentials" in sinks["model requests"] and "Noted" in sinks["slack posts"]
    assert "request_received" in sinks["audit export"] and "inbox_event" in sinks["tables"]
    leaks = [(sink, secret) for sink, content in sinks.items() for secret in secrets if secret in content]
    assert leaks == []


@pytest.mark.timeout(30)
def test_redacting_a_very_long_value_takes_linear_time():
    """A pasted 400 kB run of letters once made the URL-password pattern quadratic (minutes per value)."""
    redactor = Redactor(["s3cret-value"])
    assert redactor.redact_text("x" * 400_000 + " s3cret-value") == "x" * 400_000 + " [REDACTED]"


def test_a_secret_added_later_is_masked_in_a_text_redacted_before():
    """Texts are remembered redacted (the system prompt and the history come by on every model call);
    a secret registered afterwards (the audit keys, at start-up) must still be masked in them."""
    redactor = Redactor(["first-secret"])
    prompt = "You are the ops assistant; the vault password is later-secret and the token first-secret. " * 2
    assert redactor.redact_text(prompt).count("[REDACTED]") == 2  # remembered with one secret known
    redactor.add(["later-secret"])
    assert "later-secret" not in redactor.redact_text(prompt)
    assert redactor.redact({"messages": [{"content": prompt}]})["messages"][0]["content"].count("[REDACTED]") == 4
