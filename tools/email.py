"""The e-mail tool: `send_email` over SMTP, run with smtplib in a worker thread.

Everything that can be refused is refused in `check`, before a card is shown: bad addresses,
domains outside CHATOPS_EMAIL_ALLOWED_DOMAINS, too many recipients, a missing SMTP setting.
Delivery follows RFC 5321's split: a 4xx reply (or a connection failure before DATA) is
temporary and retried with backoff a bounded number of times; a 5xx reply fails at once with
the server's words. Once the message body has been sent, a lost connection means the server
may have accepted it (RFC 1047): that is `ToolInDoubt`, never resent. The Message-ID is derived
from the approval id, so a human reconciling an in-doubt send can search for it.
"""

from __future__ import annotations

import asyncio
import email.policy
import re
import smtplib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import Field
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from bot.config import Settings
from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolInDoubt, ToolUnavailable
from tools.registry import Toolset

__all__ = ["toolset"]

toolset = Toolset("email")

MAX_RECIPIENTS = 50
ATTEMPTS = 3
DEFAULT_PORTS = {"ssl": 465, "starttls": 587, "none": 25}
# Non-ASCII bodies go out quoted-printable/base64 (7bit-clean, so no 8BITMIME is needed);
# non-ASCII headers are RFC 2047 encoded. SMTPUTF8 is used only for internationalised addresses.
ASCII_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_SPLIT = re.compile(r"[,;]")

Recipients = Annotated[str | list[str], Field(description="One address, or a list of addresses.")]


class _Temporary(Exception):
    """A 4xx reply or a failure before the message was sent: safe to try again."""


@dataclass(frozen=True)
class _Envelope:
    sender: str
    recipients: list[str]
    payload: bytes
    smtputf8: bool


def _addresses(value: str | list[str] | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [part.strip() for item in items for part in _SPLIT.split(item) if part.strip()]


def _validated(settings: Settings, raw: list[str]) -> list[tuple[str, bool]]:
    """(normalised address, needs SMTPUTF8) for each address, or ArgumentError naming the bad one."""
    allowed = settings.allowed_email_domains
    result = []
    for address in raw:
        try:
            checked = validate_email(address, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ArgumentError(f"{address!r} is not a valid e-mail address: {exc}") from None
        domains = {checked.domain.lower(), (checked.ascii_domain or "").lower()}
        if allowed and not domains & allowed:
            raise ArgumentError(f"E-mail to {checked.domain} is not allowed here; allowed domains: {', '.join(sorted(allowed))}.")
        result.append((checked.normalized, bool(checked.smtputf8)))
    return result


def _require_config(settings: Settings) -> tuple[str, str]:
    """(host, envelope sender) or ToolUnavailable naming the variable to set."""
    if not settings.smtp_host:
        raise ToolUnavailable("E-mail is not configured: set SMTP_HOST (and SMTP_FROM) to send e-mail.")
    sender = parseaddr(settings.smtp_from or "")[1]
    if not sender or "@" not in sender:
        raise ToolUnavailable("E-mail is not configured: set SMTP_FROM to the sender address (e.g. bot@example.com).")
    return settings.smtp_host, sender


async def _check(ctx: ToolContext, args: dict[str, Any]) -> None:
    _require_config(ctx.settings)
    to, cc = _addresses(args["to"]), _addresses(args.get("cc"))
    if not to:
        raise ArgumentError("There is no recipient in `to`.")
    if len(to) + len(cc) > MAX_RECIPIENTS:
        raise ArgumentError(f"Too many recipients ({len(to) + len(cc)}); at most {MAX_RECIPIENTS} per e-mail.")
    _validated(ctx.settings, to + cc)
    if "\n" in args["subject"] or "\r" in args["subject"]:
        raise ArgumentError("The subject must be a single line.")


def _describe(args: dict[str, Any]) -> str:
    cc = _addresses(args.get("cc"))
    copy = f" (cc {', '.join(cc)})" if cc else ""
    return f"Send an e-mail to {', '.join(_addresses(args['to']))}{copy} with the subject “{args['subject']}”"


def _message(
    settings: Settings, to: list[str], cc: list[str], subject: str, body: str, approval_id: str | None, smtputf8: bool
) -> EmailMessage:
    domain = parseaddr(settings.smtp_from or "")[1].rpartition("@")[2] or "chatops"
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if smtputf8 else ASCII_POLICY)
    msg["From"] = settings.smtp_from
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<{approval_id}@{domain}>" if approval_id else make_msgid(domain=domain)
    msg.set_content(body)
    return msg


def as_received(args: dict[str, Any]) -> dict[str, str]:
    """The mail as its recipients will read it (To, Cc, Subject, Body), built like `_message`: the card shows this."""
    to, cc = _addresses(args.get("to")), _addresses(args.get("cc"))
    shown = [_normalised(a) for a in to + cc]
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if any(not a.isascii() for a in shown) else ASCII_POLICY)
    msg["Subject"] = args["subject"]
    msg.set_content(args["body"])
    received = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    body = received.get_content().replace("\r\n", "\n")
    body = body if args["body"].endswith(("\n", "\r")) else body.removesuffix("\n")
    mail = {"To": ", ".join(shown[: len(to)])}
    if cc:
        mail["Cc"] = ", ".join(shown[len(to) :])
    return {**mail, "Subject": str(received["Subject"]), "Body": body}


def _normalised(address: str) -> str:
    try:
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError:
        return address


def _refused(code: int, reply: bytes, stage: str) -> Exception:
    text = f"{code} {reply.decode('utf-8', 'replace')}".strip()
    if 400 <= code < 500:
        return _Temporary(f"{stage}: {text}")
    return ToolError(f"The mail server refused the message at {stage}: {text}")


def _data_block(payload: bytes) -> bytes:
    """The message as sent after DATA: CRLF-terminated, leading dots doubled, ended by CRLF.CRLF."""
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", payload) + b".\r\n"


def _deliver(settings: Settings, host: str, envelope: _Envelope) -> str:
    """One delivery attempt (blocking; runs in a worker thread). Returns the server's final reply."""
    port = settings.smtp_port or DEFAULT_PORTS[settings.smtp_security]
    timeout = settings.smtp_timeout
    try:
        if settings.smtp_security == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
    except (OSError, smtplib.SMTPException) as exc:
        raise _Temporary(f"cannot connect to {host}:{port} ({exc})") from None
    try:
        try:
            _before_data(settings, smtp, envelope)
        except smtplib.SMTPAuthenticationError as exc:
            raise ToolUnavailable(
                f"The mail server refused our login ({exc.smtp_code}); check SMTP_USERNAME and SMTP_PASSWORD."
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise ToolUnavailable(f"The mail server does not support {exc}; check SMTP_SECURITY.") from None
        except smtplib.SMTPResponseException as exc:
            raise _refused(exc.smtp_code, exc.smtp_error, "connection setup") from None
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            raise _Temporary(f"connection lost before the message was sent ({exc})") from None
        try:
            smtp.send(_data_block(envelope.payload))
            code, reply = smtp.getreply()
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            raise ToolInDoubt(
                f"the connection to the mail server was lost after the message was sent ({exc}); it may have been delivered"
            ) from None
        if code != 250:
            raise _refused(code, reply, "end of DATA")
        return reply.decode("utf-8", "replace")
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


def _before_data(settings: Settings, smtp: smtplib.SMTP, envelope: _Envelope) -> None:
    """EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA: everything up to the 354 go-ahead. Nothing is sent yet."""
    smtp.ehlo_or_helo_if_needed()
    if settings.smtp_security == "starttls":
        smtp.starttls(context=ssl.create_default_context())
        smtp.ehlo()
    if settings.smtp_username:
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
        smtp.login(settings.smtp_username, password)
    options = []
    if envelope.smtputf8:
        if not smtp.has_extn("smtputf8"):
            raise ToolError("The mail server does not accept internationalised addresses (no SMTPUTF8).")
        options.append("SMTPUTF8")
    code, reply = smtp.mail(envelope.sender, options)
    if code != 250:
        raise _refused(code, reply, "MAIL FROM")
    for recipient in envelope.recipients:
        code, reply = smtp.rcpt(recipient)
        if code not in (250, 251):
            smtp.rset()  # all recipients or none: never a partial send
            raise _refused(code, reply, f"RCPT TO <{recipient}>")
    code, reply = smtp.docmd("DATA")
    if code != 354:
        raise _refused(code, reply, "DATA")


@toolset.tool(read_only=False, describe=_describe, check=_check)
async def send_email(
    ctx: ToolContext,
    to: Recipients,
    subject: Annotated[str, Field(min_length=1, max_length=250)],
    body: Annotated[str, Field(max_length=100_000)],
    cc: Recipients | None = None,
) -> dict[str, Any]:
    """Send a plain-text e-mail (any language) from the bot's mailbox.

    Args:
        to: The recipients.
        subject: The subject line.
        body: The text of the message.
        cc: Recipients in copy.
    """
    settings = ctx.settings
    host, sender = _require_config(settings)
    to_checked = _validated(settings, _addresses(to))
    cc_checked = _validated(settings, _addresses(cc))
    everyone = to_checked + cc_checked
    smtputf8 = any(needs for _, needs in everyone)
    msg = _message(settings, [a for a, _ in to_checked], [a for a, _ in cc_checked], subject, body, ctx.approval_id, smtputf8)
    envelope = _Envelope(sender, [a for a, _ in everyone], msg.as_bytes(), smtputf8)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential_jitter(initial=1, max=8),
        retry=retry_if_exception_type(_Temporary),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                reply = await asyncio.to_thread(_deliver, settings, host, envelope)
    except _Temporary as exc:
        raise ToolUnavailable(f"The mail server failed temporarily {ATTEMPTS} times ({exc}); nothing was sent.") from None
    return {
        "result": "sent",
        "message_id": msg["Message-ID"],
        "to": [a for a, _ in to_checked],
        "cc": [a for a, _ in cc_checked],
        "server_reply": reply,
    }
