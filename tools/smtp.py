"""Delivering one message over SMTP (smtplib), in a bounded thread pool of its own, honestly classified.

The point of no return is the end of the message: until the final `.` of DATA has been handed
to the network, the server cannot have accepted anything. So every failure before it (connect,
TLS, a greeting that never comes, AUTH, `MAIL FROM`/`RCPT TO` refused, a connection lost while
the message is being sent) is `ToolUnavailable`/`ToolError` ("not sent: <reason>"), and only a
loss after it, before the server's reply, is `ToolInDoubt` (RFC 1047), never resent.

4xx replies and refused connections are temporary (RFC 5321) and retried with backoff; a step
that times out is not (a hung server stays hung). Each step has `SmtpConfig.timeout`; the whole
send, retries and the wait for a free worker included, fits in `SmtpConfig.budget`.
smtplib blocks, so it runs in the sender's own `ThreadPoolExecutor(max_workers=workers)`,
never the loop's default executor (which `getaddrinfo` needs): hung servers cannot starve the bot.
"""

from __future__ import annotations

import asyncio
import random
import re
import smtplib
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tools.config import SmtpConfig
from tools.errors import ToolError, ToolInDoubt, ToolUnavailable
from tools.phrases import Sentence

# What a send's failures say (the model reads the English; a decided card shows them translated)
REFUSED = Sentence("smtp.REFUSED", "not sent: the mail server refused the message at {stage}: {reply}")
ANSWERED = Sentence("smtp.ANSWERED", "the mail server answered {reply} at {stage}")
CONNECTION_REFUSED = Sentence("smtp.CONNECTION_REFUSED", "{server} refused the connection")
GAVE_UP = Sentence("smtp.GAVE_UP", "not sent: {reason} (tried {attempts} times)")
WORKERS_BUSY = Sentence("smtp.WORKERS_BUSY", "not sent: all {workers} mail workers stayed busy (other sends are hanging)")
CONNECT_FAILED = Sentence("smtp.CONNECT_FAILED", "not sent: {server} failed while {stage} ({error})")
LOST_SENDING = Sentence("smtp.LOST_SENDING", "not sent: the connection failed while the message was being sent ({error})")
UNCONFIRMED = Sentence(
    "smtp.UNCONFIRMED",
    "the whole message was sent but the mail server did not confirm it ({error}); it may have been delivered",
)
LOGIN_REFUSED = Sentence(
    "smtp.LOGIN_REFUSED", "not sent: the mail server refused our login ({code}); check SMTP_USERNAME and SMTP_PASSWORD"
)
UNSUPPORTED = Sentence("smtp.UNSUPPORTED", "not sent: the mail server does not support {feature}; check SMTP_SECURITY")
LOST_AT = Sentence("smtp.LOST_AT", "not sent: the connection to the mail server failed at {stage} ({error})")
NO_SMTPUTF8 = Sentence("smtp.NO_SMTPUTF8", "not sent: the mail server does not accept internationalised addresses (no SMTPUTF8)")

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 8.0


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: list[str]
    payload: bytes
    smtputf8: bool


class _Temporary(Exception):
    """A 4xx reply or a refused connection: nothing was sent, and trying again may work."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Staged:
    """smtplib with a `stage` attribute naming the step in progress, for the "not sent" reason."""

    stage = "connecting"

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]  # private in smtplib, not in typeshed
        self.stage = "waiting for the greeting"
        return sock


class _Smtp(_Staged, smtplib.SMTP):
    pass


class _SmtpSsl(_Staged, smtplib.SMTP_SSL):
    pass


def _reply_text(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply  # smtplib's errors may carry str
    return f"{code} {text}".strip()


def _refused(code: int, reply: bytes | str, stage: str) -> Exception:
    text = _reply_text(code, reply)
    if 400 <= code < 500:
        return _Temporary(ANSWERED(reply=text, stage=stage))
    return ToolError(REFUSED(stage=stage, reply=text))


def data_block(payload: bytes) -> bytes:
    """The message as sent after DATA: CRLF-terminated, leading dots doubled, ended by CRLF.CRLF."""
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", payload) + b".\r\n"


class SmtpSender:
    """Sends envelopes with one `SmtpConfig`; owns its worker threads. `close()` on shutdown."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="smtp")

    def close(self) -> None:
        """Stop taking work. A thread still talking to a server ends at its own timeouts."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def send(self, envelope: Envelope) -> str:
        """Deliver, retrying temporary refusals within the budget. Returns the server's final reply."""
        deadline = time.monotonic() + self.config.budget
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.config.attempts + 1):
            try:
                return await loop.run_in_executor(self._pool, self._deliver, envelope, deadline)
            except _Temporary as exc:
                wait = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if attempt == self.config.attempts or time.monotonic() + wait + self.config.timeout > deadline:
                    raise ToolUnavailable(GAVE_UP(reason=exc.reason, attempts=attempt)) from None
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _step_timeout(self, smtp: smtplib.SMTP | None, deadline: float) -> float:
        """This step's timeout: the configured one, or what is left of the budget if less."""
        left = deadline - time.monotonic()
        if left <= 0.05:
            raise TimeoutError("the send's time budget is spent")
        timeout = min(self.config.timeout, left)
        if smtp is not None and smtp.sock is not None:
            smtp.sock.settimeout(timeout)
        return timeout

    def _connect(self, deadline: float) -> smtplib.SMTP:
        config = self.config
        if deadline - time.monotonic() <= 0.05:
            raise ToolUnavailable(WORKERS_BUSY(workers=config.workers))
        timeout = self._step_timeout(None, deadline)
        smtp: smtplib.SMTP
        if config.security == "ssl":
            smtp = _SmtpSsl(timeout=timeout, context=ssl.create_default_context())
        else:
            smtp = _Smtp(timeout=timeout)
        where = f"{config.host}:{config.server_port}"
        try:
            code, reply = smtp.connect(config.host, config.server_port)
        except ConnectionRefusedError:
            smtp.close()
            raise _Temporary(CONNECTION_REFUSED(server=where)) from None
        except (OSError, smtplib.SMTPException) as exc:
            smtp.close()
            stage = getattr(smtp, "stage", "connecting")
            raise ToolUnavailable(CONNECT_FAILED(server=where, stage=stage, error=_why(exc))) from None
        if code != 220:
            smtp.close()
            raise _refused(code, reply, "the greeting")
        return smtp

    def _deliver(self, envelope: Envelope, deadline: float) -> str:
        """One attempt (blocking; runs in a worker thread)."""
        smtp = self._connect(deadline)
        try:
            self._before_data(smtp, envelope, deadline)
            block = data_block(envelope.payload)
            try:
                self._step_timeout(smtp, deadline)
                smtp.send(block)
            except (OSError, smtplib.SMTPException) as exc:
                raise ToolUnavailable(LOST_SENDING(error=_why(exc))) from None
            try:
                self._step_timeout(smtp, deadline)
                code, reply = smtp.getreply()
            except (OSError, smtplib.SMTPException) as exc:
                raise ToolInDoubt(UNCONFIRMED(error=_why(exc))) from None
            if code != 250:
                raise _refused(code, reply, "the end of the message")
            return reply.decode("utf-8", "replace")
        finally:
            _quit(smtp)

    def _before_data(self, smtp: smtplib.SMTP, envelope: Envelope, deadline: float) -> None:
        """EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA: everything up to the 354 go-ahead. Nothing is sent yet.
        Each step names itself first (`_at`), so a failure says where it happened."""
        try:
            _at(smtp, "EHLO")
            self._step_timeout(smtp, deadline)
            smtp.ehlo_or_helo_if_needed()
            if self.config.security == "starttls":
                _at(smtp, "STARTTLS")
                self._step_timeout(smtp, deadline)
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self.config.username:
                _at(smtp, "login")
                self._step_timeout(smtp, deadline)
                smtp.login(self.config.username, self.config.password or "")
            self._envelope(smtp, envelope, deadline)
        except smtplib.SMTPAuthenticationError as exc:
            raise ToolUnavailable(LOGIN_REFUSED(code=exc.smtp_code)) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise ToolUnavailable(UNSUPPORTED(feature=str(exc))) from None
        except smtplib.SMTPResponseException as exc:
            raise _refused(exc.smtp_code, exc.smtp_error, _stage(smtp)) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise ToolUnavailable(LOST_AT(stage=_stage(smtp), error=_why(exc))) from None

    def _envelope(self, smtp: smtplib.SMTP, envelope: Envelope, deadline: float) -> None:
        options = []
        if envelope.smtputf8:
            if not smtp.has_extn("smtputf8"):
                raise ToolError(NO_SMTPUTF8())
            options.append("SMTPUTF8")
        _at(smtp, "MAIL FROM")
        self._step_timeout(smtp, deadline)
        code, reply = smtp.mail(envelope.sender, options)
        if code != 250:
            raise _refused(code, reply, "MAIL FROM")
        for recipient in envelope.recipients:
            _at(smtp, f"RCPT TO <{recipient}>")
            self._step_timeout(smtp, deadline)
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                smtp.rset()  # all recipients or none: never a partial send
                raise _refused(code, reply, f"RCPT TO <{recipient}>")
        _at(smtp, "DATA")
        self._step_timeout(smtp, deadline)
        code, reply = smtp.docmd("DATA")
        if code != 354:
            raise _refused(code, reply, "DATA")


def _at(smtp: smtplib.SMTP, stage: str) -> None:
    """Name the step `smtp` is about to take (read back by `_stage` when it fails)."""
    if isinstance(smtp, _Staged):
        smtp.stage = stage


def _stage(smtp: smtplib.SMTP) -> str:
    return smtp.stage if isinstance(smtp, _Staged) else "EHLO"


def _why(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError | socket.timeout) or "timed out" in text:
        return "no answer in time"
    return text or type(exc).__name__


def _quit(smtp: Any) -> None:
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(1.0)
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()
