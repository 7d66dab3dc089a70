"""The e-mail tool: `send_email`, delivered by the configured `tools.smtp.SmtpSender`.

Everything that can be refused is refused in `check`, before a card is shown: bad addresses,
domains outside CHATOPS_EMAIL_ALLOWED_DOMAINS, too many recipients, e-mail not configured.
Delivery and its honest classification ("not sent" vs "in doubt") live in `tools/smtp.py`.
The Message-ID is derived from the approval id, so a human reconciling an in-doubt send can
search for it.
"""

from __future__ import annotations

import email.policy
import re
import unicodedata
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import Field

from tools.config import SmtpConfig
from tools.context import ToolContext
from tools.errors import ArgumentError, ToolUnavailable
from tools.phrases import Sentence
from tools.registry import Toolset
from tools.smtp import Envelope, SmtpSender

__all__ = ["toolset"]

toolset = Toolset("email")

MAX_RECIPIENTS = 50
# Non-ASCII bodies go out quoted-printable/base64 (7bit-clean, so no 8BITMIME is needed);
# non-ASCII headers are RFC 2047 encoded. SMTPUTF8 is used only for internationalised addresses.
ASCII_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_SPLIT = re.compile(r"[,;]")

Recipients = Annotated[str | list[str], Field(description="One address, or a list of addresses.")]


def _addresses(value: str | list[str] | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [part.strip() for item in items for part in _SPLIT.split(item) if part.strip()]


def _validated(config: SmtpConfig, raw: list[str]) -> list[tuple[str, bool]]:
    """(normalised address, needs SMTPUTF8) for each address, or ArgumentError naming the bad one."""
    allowed = config.allowed_domains
    result = []
    for address in raw:
        try:
            checked = validate_email(address, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ArgumentError(f"{address!r} is not a valid e-mail address: {exc}") from None
        domains = {checked.domain.lower(), (checked.ascii_domain or "").lower()}
        if allowed and not domains & allowed:
            raise ArgumentError(f"E-mail to {checked.domain} is not allowed here; allowed domains: {', '.join(sorted(allowed))}.")
        # An ASCII local part at an internationalised domain goes out with the domain's ASCII (IDNA)
        # form: the same mailbox, and no SMTPUTF8 needed. Only a non-ASCII local part needs SMTPUTF8.
        result.append((checked.ascii_email, False) if checked.ascii_email else (checked.normalized, True))
    return result


def _sender(ctx: ToolContext) -> SmtpSender:
    """The configured sender, or ToolUnavailable naming the variables to set."""
    if ctx.smtp is None:
        raise ToolUnavailable(UNCONFIGURED())
    return ctx.smtp


async def _check(ctx: ToolContext, args: dict[str, Any]) -> None:
    config = _sender(ctx).config
    to, cc = _addresses(args["to"]), _addresses(args.get("cc"))
    if not to:
        raise ArgumentError("There is no recipient in `to`.")
    if len(to) + len(cc) > MAX_RECIPIENTS:
        raise ArgumentError(f"Too many recipients ({len(to) + len(cc)}); at most {MAX_RECIPIENTS} per e-mail.")
    _validated(config, to + cc)
    if any(_breaks_header(ch) for ch in args["subject"]):
        raise ArgumentError("The subject must be a single line of text, without line breaks or control characters.")


def _breaks_header(char: str) -> bool:
    """A character a mail header cannot carry as text: line breaks of every kind (\\v, \\f, U+0085,
    U+2028 ...) and other control characters; a tab is fine."""
    return char != "\t" and unicodedata.category(char) in ("Cc", "Zl", "Zp")


DESCRIBE = Sentence("email.DESCRIBE", "Send an e-mail to {to} with the subject “{subject}”")
DESCRIBE_CC = Sentence("email.DESCRIBE_CC", "Send an e-mail to {to} (cc {cc}) with the subject “{subject}”")
SENT = Sentence("email.SENT", "Sent the e-mail to {to}; the mail server accepted it.")
UNCONFIGURED = Sentence("email.UNCONFIGURED", "E-mail is not configured: set SMTP_HOST and SMTP_FROM to send e-mail.")


def _describe(args: dict[str, Any]) -> str:
    to, cc = ", ".join(_addresses(args["to"])), ", ".join(_addresses(args.get("cc")))
    if cc:
        return DESCRIBE_CC(to=to, cc=cc, subject=args["subject"])
    return DESCRIBE(to=to, subject=args["subject"])


def _message(
    config: SmtpConfig, to: list[str], cc: list[str], subject: str, body: str, approval_id: str | None, smtputf8: bool
) -> EmailMessage:
    domain = config.envelope_sender.rpartition("@")[2] or "chatops"
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if smtputf8 else ASCII_POLICY)
    msg["From"] = config.sender
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
    sender = _sender(ctx)
    config = sender.config
    to_checked = _validated(config, _addresses(to))
    cc_checked = _validated(config, _addresses(cc))
    everyone = to_checked + cc_checked
    smtputf8 = any(needs for _, needs in everyone)
    msg = _message(config, [a for a, _ in to_checked], [a for a, _ in cc_checked], subject, body, ctx.approval_id, smtputf8)
    reply = await sender.send(Envelope(config.envelope_sender, [a for a, _ in everyone], msg.as_bytes(), smtputf8))
    return {
        "result": "sent",
        "message": SENT(to=", ".join(a for a, _ in everyone)),
        "message_id": msg["Message-ID"],
        "to": [a for a, _ in to_checked],
        "cc": [a for a, _ in cc_checked],
        "server_reply": reply,
    }
