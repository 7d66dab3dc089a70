"""A scriptable SMTP server (aiosmtpd, in the test's own event loop, on a free port of 127.0.0.1).

Each DATA transaction takes the next scripted answer: an SMTP reply such as "250 OK" or
"451 4.3.0 try later", or `DROP`, which closes the connection after the whole message was
received without answering (the RFC 1047 duplicate window). Every DATA transaction that
reached the end of the message is recorded in `attempts`; accepted ones also in `delivered`.
Addresses in `refused_recipients` are refused at RCPT TO with a 550.
`RawSmtp` (below) misbehaves where aiosmtpd will not: no greeting, a 5xx greeting, no answer to
the final `.`, a reset in the middle of the message.
"""

from __future__ import annotations

import asyncio
import socket
import struct
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
    refused_recipients: set[str] = field(default_factory=set)
    port: int = 0
    _server: asyncio.Server | None = None

    def answer(self, *replies: str) -> None:
        self.script.extend(replies)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if address in self.refused_recipients:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

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


class RawSmtp:
    """A misbehaving SMTP server on raw sockets, for the failures aiosmtpd will not produce.

    `mode` (changeable at any time, read per connection):
    - "no_greeting": accepts the TCP connection and never says a word;
    - "greet:<reply>": answers the connection with `<reply>` (e.g. "554 5.3.2 no service") and closes;
    - "hang_after_data": a normal dialogue up to the end of the message, then never answers the final `.`;
    - "drop_mid_data": after the 354 go-ahead, reads the first bytes of the message and resets the connection;
    - "hang_at_data": a normal dialogue up to RCPT, then never answers the DATA command.
    `release()` ends every held connection and makes later ones close at once.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.messages: list[bytes] = []
        self.port = 0
        self._changed = asyncio.Event()
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def until(self, predicate: Any) -> None:
        """Wait (on events, not sleeps) until `predicate(self)` holds."""
        while not predicate(self):
            self._changed.clear()
            await self._changed.wait()

    def _note(self) -> None:
        self._changed.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        self._note()
        mode = "closed" if self._released.is_set() else self.mode
        try:
            if mode.startswith("greet:"):
                writer.write(mode.removeprefix("greet:").encode() + b"\r\n")
                await writer.drain()
            elif mode == "no_greeting":
                await self._released.wait()
            elif mode in ("hang_after_data", "drop_mid_data", "hang_at_data"):
                await self._dialogue(reader, writer, mode)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str) -> None:
        writer.write(b"220 raw-smtp.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA" and mode == "hang_at_data":
                await self._released.wait()
                return
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                if mode == "drop_mid_data":
                    self.messages.append(await reader.read(1024))  # the start of the message...
                    self._note()
                    _reset(writer)  # ...then a reset, while the sender is still sending (see `start`)
                    return
                self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                self._note()
                await self._released.wait()  # never answer the final "."
                return
            writer.write(b"221 bye\r\n" if verb == b"QUIT" else b"250 OK\r\n")
            await writer.drain()
            if verb == b"QUIT":
                return

    def release(self) -> None:
        self._released.set()
        for writer in list(self._writers):
            writer.transport.abort()

    async def __aenter__(self) -> RawSmtp:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window (and asyncio's default 64 KiB read limit): a message larger than the
        # sender's socket buffer (at most 4 MiB by default) cannot all be handed to the kernel before
        # the server reads it, so a reset after its first bytes reaches the sender mid-message.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._handle, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
