"""Canary secrets: planted in the configuration, in user messages and in tool errors; after a full
conversation at DEBUG, none appears in log lines, audit rows, model requests or chat messages."""

from __future__ import annotations

import io
import json
import logging

import sqlalchemy as sa

from bot.logsetup import redacting_handler
from storage.models import AuditEvent, Conversation
from storage.redact import Redactor
from tests.fakes.openai_server import calls, text
from tests.test_core_agent import approval_ids
from tools.context import ToolContext
from tools.errors import ToolError
from tools.registry import Toolset

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
