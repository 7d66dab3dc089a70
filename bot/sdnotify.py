"""systemd's service notifications (`sd_notify(3)`), sent only when systemd asks for them.

- `READY=1` once `chatops serve` serves (its start-up line), so `Type=notify` units start what
  depends on the bot only then;
- `WATCHDOG=1` from the event loop, every half `WatchdogSec`, while the loop turns: a front whose
  loop is stuck (acks unanswered) stops sending them, and systemd kills and restarts it;
- `STOPPING=1` when a stop signal arrives.

Nothing is sent without `$NOTIFY_SOCKET`; the watchdog runs only when `$WATCHDOG_USEC` is set for
this process (`$WATCHDOG_PID` absent or ours). The variables are taken out of the environment once
read, as `sd_notify(unset_environment=1)` does, so the worker processes never speak for the service.
The protocol is one datagram on a Unix socket (a leading `@` names an abstract one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("chatops")
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ServiceNotifier:
    """The service manager's notification socket, when there is one."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.interval = int(usec) / 2_000_000 if usec.isdigit() and int(usec) > 0 and ours and self.address else None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> ServiceNotifier:
        """The notifier `environ` (the process's) describes; its variables are then removed from it."""
        environ = os.environ if environ is None else environ
        notifier = cls(environ)
        for name in _VARIABLES:
            environ.pop(name, None)
        return notifier

    def notify(self, state: str) -> None:
        """Send `state` (`READY=1`...); a socket that refuses it is said once in the log, never raised."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(state.encode())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("could not notify the service manager (%s): %s", state, type(exc).__name__)

    async def keep_alive(self) -> None:
        """Send `WATCHDOG=1` every half watchdog interval, from the event loop, until cancelled."""
        if self.interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.interval)
