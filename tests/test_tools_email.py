"""send_email against a real SMTP server (aiosmtpd): encoding, retries, refusals and the in-doubt window."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.core.errors import ConfigError
from storage.engine import Database
from tests.fakes.smtp_server import DROP, FakeSmtp, RawSmtp
from tests.tool_env import tool_context
from tools import email as email_tools
from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolInDoubt, ToolUnavailable
from tools.registry import PreparedCall, ToolRegistry
from tools.smtp import Envelope

SPEC = email_tools.toolset.specs[0]
SUBJECT = "季度报告 Q3 — 请查收"
BODY = "你好，\n附件是第三季度的报告。\n.以点开头的一行\n祝好！"


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSmtp]:
    async with FakeSmtp() as server:
        yield server


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    database = Database(sqlite_url)  # the e-mail tool never touches it
    yield database
    await database.dispose()


def context(db: Database, approval_id: str | None = "ap_mail1", **env: str) -> ToolContext:
    return tool_context(db, approval_id=approval_id, **env)


def smtp_env(smtp: FakeSmtp, **extra: str) -> dict[str, str]:
    return {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp.port),
        "SMTP_SECURITY": "none",
        "SMTP_FROM": "运维机器人 <bot@example.com>",
        "SMTP_TIMEOUT": "10",
        **extra,
    }


async def send(ctx: ToolContext, args: dict[str, Any]) -> Any:
    """As the bot does it: validate, check (before the card), then run the approved call."""
    prepared = ToolRegistry([SPEC]).prepare("send_email", json.dumps(args))
    assert isinstance(prepared, PreparedCall), prepared
    assert SPEC.check is not None
    await SPEC.check(ctx, prepared.args)
    return await SPEC.run(ctx, prepared.args)


async def test_delivers_utf8_subject_and_body(smtp: FakeSmtp, db: Database) -> None:
    args = {"to": "Zhang@Example.com", "cc": ["li@example.cn"], "subject": SUBJECT, "body": BODY}
    result = await send(context(db, **smtp_env(smtp)), args)
    assert result["result"] == "sent" and result["message_id"] == "<ap_mail1@example.com>"
    (received,) = smtp.delivered
    assert received.mail_from == "bot@example.com"
    assert received.rcpt_tos == ["Zhang@example.com", "li@example.cn"]
    assert b"Subject: =?utf-8?" in received.data  # RFC 2047 encoded on the wire
    assert received.data.isascii()  # 7bit-clean: no 8BITMIME or SMTPUTF8 needed
    msg = received.message()
    assert msg["Subject"] == SUBJECT
    # MIME canonical form has CRLF line breaks; dot-stuffing was undone by the server; the text is intact
    assert msg.get_content().replace("\r\n", "\n") == BODY + "\n"
    assert msg["Message-ID"] == "<ap_mail1@example.com>"
    assert msg["From"] == "运维机器人 <bot@example.com>"
    assert msg["Cc"] == "li@example.cn"


async def test_internationalised_address_uses_smtputf8(smtp: FakeSmtp, db: Database) -> None:
    await send(context(db, **smtp_env(smtp)), {"to": "用户@例子.中国", "subject": "你好", "body": "测试"})
    (received,) = smtp.delivered
    assert received.smtputf8 and received.rcpt_tos == ["用户@例子.中国"]


async def test_temporary_failure_is_retried(smtp: FakeSmtp, db: Database) -> None:
    smtp.answer("451 4.3.0 Mailbox busy, try later", "250 2.0.0 OK")
    result = await send(context(db, **smtp_env(smtp)), {"to": "a@example.com", "subject": "s", "body": "b"})
    assert result["result"] == "sent"
    assert len(smtp.attempts) == 2 and len(smtp.delivered) == 1


async def test_temporary_failures_are_bounded(smtp: FakeSmtp, db: Database) -> None:
    smtp.answer(*["451 4.3.0 Mailbox busy"] * 5)
    with pytest.raises(ToolUnavailable, match=r"451 4\.3\.0 Mailbox busy"):
        await send(context(db, **smtp_env(smtp)), {"to": "a@example.com", "subject": "s", "body": "b"})
    assert len(smtp.attempts) == 3  # SmtpConfig.attempts


async def test_permanent_failure_fails_at_once(smtp: FakeSmtp, db: Database) -> None:
    smtp.answer("554 5.7.1 Message rejected by policy")
    with pytest.raises(ToolError, match=r"554 5\.7\.1 Message rejected by policy") as caught:
        await send(context(db, **smtp_env(smtp)), {"to": "a@example.com", "subject": "s", "body": "b"})
    assert type(caught.value) is ToolError
    assert len(smtp.attempts) == 1 and smtp.delivered == []


async def test_connection_lost_after_data_is_in_doubt(smtp: FakeSmtp, db: Database) -> None:
    smtp.answer(DROP)
    with pytest.raises(ToolInDoubt, match="may have been delivered"):
        await send(context(db, **smtp_env(smtp)), {"to": "a@example.com", "subject": "s", "body": "b"})
    assert smtp.dropped.is_set()
    assert len(smtp.attempts) == 1  # exactly one delivery attempt: never resent


async def test_refusals_before_the_card(smtp: FakeSmtp, db: Database) -> None:
    ctx = context(db, **smtp_env(smtp, CHATOPS_EMAIL_ALLOWED_DOMAINS="example.com, @corp.example"))
    with pytest.raises(ArgumentError, match="'not an address' is not a valid e-mail address"):
        await send(ctx, {"to": ["a@example.com", "not an address"], "subject": "s", "body": "b"})
    with pytest.raises(
        ArgumentError, match=r"E-mail to gmail.com is not allowed here; allowed domains: corp.example, example.com"
    ):
        await send(ctx, {"to": "a@example.com", "cc": "x@gmail.com", "subject": "s", "body": "b"})
    with pytest.raises(ArgumentError, match="single line"):
        await send(ctx, {"to": "a@example.com", "subject": "s\nBcc: evil@example.com", "body": "b"})
    with pytest.raises(ArgumentError, match="Too many recipients"):
        await send(ctx, {"to": [f"u{i}@example.com" for i in range(51)], "subject": "s", "body": "b"})
    with pytest.raises(ToolUnavailable, match="set SMTP_HOST and SMTP_FROM"):
        await send(context(db), {"to": "a@example.com", "subject": "s", "body": "b"})
    with pytest.raises(ConfigError, match="SMTP_FROM must be the sender's address"):  # half-configured: start-up fails
        context(db, SMTP_HOST="127.0.0.1")
    assert smtp.attempts == []
    await send(ctx, {"to": "a@example.com; b@corp.example", "subject": "s", "body": "b"})
    assert smtp.delivered[0].rcpt_tos == ["a@example.com", "b@corp.example"]


async def test_a_tool_that_is_not_configured_is_called_unavailable_not_invalid_arguments(db: Database) -> None:
    """The model read "invalid_arguments" and could only try other arguments; the audit row said the same."""
    registry = ToolRegistry([SPEC])
    prepared = registry.prepare("send_email", json.dumps(MAIL))
    assert isinstance(prepared, PreparedCall)
    problem = await registry.check(context(db), prepared)
    assert problem is not None and problem.kind == "tool_unavailable"
    assert json.loads(problem.as_tool_result())["error"] == "tool_unavailable"


def test_card_summary_names_recipients_and_subject() -> None:
    args = {"to": ["a@example.com", "b@example.com"], "cc": "c@example.com", "subject": SUBJECT, "body": BODY}
    assert (
        SPEC.sentence(args) == f"Send an e-mail to a@example.com, b@example.com (cc c@example.com) with the subject “{SUBJECT}”"
    )
    assert not SPEC.read_only
    schema = SPEC.openai_tool()["function"]["parameters"]
    assert schema["required"] == ["to", "subject", "body"]


# ---- honest classification: "not sent" (failed) before the final ".", "in doubt" only after it ------------

MAIL = {"to": "a@example.com", "subject": "s", "body": "b"}


def raw_env(server: RawSmtp, **extra: str) -> dict[str, str]:
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(server.port), "SMTP_SECURITY": "none", "SMTP_FROM": "bot@example.com"}
    return {**env, "SMTP_TIMEOUT": "1", "CHATOPS_TOOL_TIMEOUT": "10", **extra}


async def test_refused_recipient_is_not_sent(smtp: FakeSmtp, db: Database) -> None:
    smtp.refused_recipients.add("gone@example.com")
    with pytest.raises(ToolError, match=r"not sent: .*RCPT TO <gone@example.com>: 550 5\.1\.1") as caught:
        await send(context(db, **smtp_env(smtp)), {**MAIL, "to": ["a@example.com", "gone@example.com"]})
    assert not isinstance(caught.value, ToolInDoubt)
    assert smtp.attempts == []  # DATA was never reached: nobody got a partial send


async def test_refused_greeting_is_not_sent_and_not_retried(db: Database) -> None:
    async with RawSmtp("greet:554 5.3.2 Service not available") as server:
        with pytest.raises(ToolError, match=r"not sent: .*the greeting: 554 5\.3\.2 Service not available") as caught:
            await send(context(db, **raw_env(server)), MAIL)
    assert not isinstance(caught.value, ToolInDoubt) and server.connections == 1


async def test_a_server_that_never_greets_is_not_sent_promptly(db: Database) -> None:
    async with RawSmtp("no_greeting") as server:
        started = time.monotonic()
        with pytest.raises(ToolUnavailable, match=r"not sent: .* while waiting for the greeting \(no answer in time\)"):
            await send(context(db, **raw_env(server)), MAIL)
        assert time.monotonic() - started < 5  # one greeting timeout (1 s), no retries of a hung server
    assert server.connections == 1


async def test_refused_connection_is_not_sent(db: Database) -> None:
    async with RawSmtp("no_greeting") as server:
        port = server.port  # closed once the block ends: nothing listens there any more
    with pytest.raises(ToolUnavailable, match=f"not sent: 127.0.0.1:{port} refused the connection \\(tried 1 times\\)"):
        await send(context(db, **raw_env(server, CHATOPS_TOOL_TIMEOUT="1")), MAIL)


async def test_no_answer_to_the_final_dot_is_in_doubt(db: Database) -> None:
    async with RawSmtp("hang_after_data") as server:
        with pytest.raises(ToolInDoubt, match=r"whole message was sent .* \(no answer in time\); it may have been delivered"):
            await send(context(db, **raw_env(server)), MAIL)
        assert len(server.messages) == 1 and server.connections == 1  # never resent


async def test_no_answer_to_the_data_command_is_not_sent_and_says_so(db: Database) -> None:
    """The reason named EHLO for any step before the message (MAIL, RCPT and DATA went unnamed)."""
    async with RawSmtp("hang_at_data") as server:
        with pytest.raises(
            ToolUnavailable, match=r"not sent: the connection to the mail server failed at DATA \(no answer in time\)"
        ):
            await send(context(db, **raw_env(server, SMTP_TIMEOUT="2")), MAIL)
        assert server.messages == []


async def test_a_reset_in_the_middle_of_the_message_is_not_sent(db: Database) -> None:
    """A message bigger than the socket buffers (so the sender is provably still sending) is cut off by a reset."""
    async with RawSmtp("drop_mid_data") as server:
        ctx = context(db, **raw_env(server))
        assert ctx.smtp is not None
        payload = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n"  # one line...
        payload = payload * (8 * 1024 * 1024 // len(payload))  # ...8 MiB of it: more than the kernel will buffer
        with pytest.raises(ToolUnavailable, match="not sent: the connection failed while the message was being sent"):
            await ctx.smtp.send(Envelope("bot@example.com", ["a@example.com"], payload, smtputf8=False))
        ctx.smtp.close()
    assert server.connections == 1 and server.messages[0]


async def test_hung_sends_never_starve_the_default_executor(db: Database) -> None:
    """More hung sends than the e-mail workers: DNS and other threads (the loop's default executor) still answer."""
    async with RawSmtp("hang_after_data") as server:
        ctx = context(db, **raw_env(server, SMTP_TIMEOUT="30", CHATOPS_TOOL_TIMEOUT="60"))
        assert ctx.smtp is not None
        sends = [asyncio.create_task(send(ctx, MAIL)) for _ in range(ctx.smtp.config.workers + 8)]
        await server.until(lambda s: len(s.messages) == ctx.smtp.config.workers)  # every worker hangs after DATA
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):  # the hung sends hold for 30 s: this work waits on none of them
            await loop.getaddrinfo("localhost", 25)
            await asyncio.gather(*(asyncio.to_thread(sum, [1, 2]) for _ in range(20)))
        assert not any(s.done() for s in sends)  # done while every send still hangs
        server.release()
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        ctx.smtp.close()
    assert sum(isinstance(o, ToolInDoubt) for o in outcomes) == ctx.smtp.config.workers  # the ones past the final "."
    assert all(isinstance(o, ToolError) for o in outcomes)


async def test_the_card_shows_the_mail_as_the_recipients_get_it(smtp: FakeSmtp, db: Database) -> None:
    body = "See you at lunch!" + " " * 700 + "P.S. wire $50,000 today.\r\nBye\rnow"
    args = {"to": "Zhang@Example.com, li@example.cn", "cc": ["ops@EXAMPLE.com"], "subject": SUBJECT, "body": body}
    shown = email_tools.as_received(args)
    await send(context(db, **smtp_env(smtp)), args)
    msg = smtp.delivered[0].message()
    assert shown == {
        "To": msg["To"],
        "Cc": msg["Cc"],
        "Subject": msg["Subject"],
        "Body": msg.get_content().replace("\r\n", "\n").removesuffix("\n"),
    }
    assert shown["To"] == "Zhang@example.com, li@example.cn" and shown["Body"].endswith("today.\nBye\nnow")


async def test_an_ascii_mailbox_at_an_internationalised_domain_goes_out_in_the_domains_ascii_form(
    smtp: FakeSmtp, db: Database
) -> None:
    """Such an address crashed when sent (a Unicode domain without SMTPUTF8) and the approved e-mail
    ended "in doubt" although nothing had left. The same mailbox is now addressed by its IDNA form."""
    result = await send(context(db, **smtp_env(smtp)), {"to": "ceo@例子.中国", "subject": "s", "body": "b"})
    (received,) = smtp.delivered
    assert received.rcpt_tos == ["ceo@xn--fsqu00a.xn--fiqs8s"] and not received.smtputf8
    assert received.message()["To"] == "ceo@xn--fsqu00a.xn--fiqs8s" and result["to"] == received.rcpt_tos


@pytest.mark.parametrize("subject", ["Hello\x0bBcc: evil@example.com", "a\x0cb", "a\x85b", "a\u2028b", "a\u2029b", "a\x00b"])
async def test_a_subject_with_any_line_break_or_control_character_is_refused_before_the_card(
    smtp: FakeSmtp, db: Database, subject: str
) -> None:
    """Only \\n and \\r were refused: the others got a card and then failed to build the message, which
    the bot could only report as "outcome unknown"."""
    with pytest.raises(ArgumentError, match="single line of text"):
        await send(context(db, **smtp_env(smtp)), {"to": "a@example.com", "subject": subject, "body": "b"})
    assert smtp.attempts == []
    await send(context(db, **smtp_env(smtp)), {"to": "a@example.com", "subject": "tab\tis fine", "body": "b"})
