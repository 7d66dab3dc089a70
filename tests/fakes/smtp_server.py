"""A scriptable SMTP server (aiosmtpd, in the test's own event loop, on a free port of 127.0.0.1).

Each DATA transaction takes the next scripted answer: an SMTP reply such as "250 OK" or
"451 4.3.0 try later", or `DROP`, which closes the connection after the whole message was
received without answering (the RFC 1047 duplicate window). Every DATA transaction that
reached the end of the message is recorded in `attempts`; accepted ones also in `delivered`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

DROP = "drop"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    smtputf8: bool

    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class FakeSmtp:
    """Use as an async context manager; `port` is where it listens."""

    script: deque[str] = field(default_factory=deque)
    attempts: list[Received] = field(default_factory=list)
    delivered: list[Received] = field(default_factory=list)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None

    def answer(self, *replies: str) -> None:
        self.script.extend(replies)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        received = Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, envelope.smtp_utf8)
        self.attempts.append(received)
        reply = self.script.popleft() if self.script else "250 2.0.0 OK queued"
        if reply == DROP:
            assert server.transport is not None
            server.transport.abort()
            self.dropped.set()
            return "250 never seen"
        if reply.startswith("250"):
            self.delivered.append(received)
        return reply

    async def __aenter__(self) -> FakeSmtp:
        loop = asyncio.get_running_loop()

        def protocol() -> Any:
            return SMTP(self, hostname="fake-smtp.test", enable_SMTPUTF8=True, loop=loop)

        self._server = await loop.create_server(protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
