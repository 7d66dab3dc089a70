"""Secret redaction for every sink: log records, audit rows, model requests and chat messages.

Two nets: the exact values of the secrets the bot was configured with, and the shapes of
well-known tokens (Slack, OpenAI, Feishu, bearer headers, passwords in URLs).

The same texts come by again and again (the system prompt and the history on every model call, a
tool's result in its audit row and in the next request), and scanning one costs tens of
microseconds a kilobyte: texts of a middling size are remembered, redacted, in a bounded LRU cache
that forgets everything when a secret is added.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

MASK = "[REDACTED]"

_TOKEN_SHAPES = re.compile(
    r"(xox[abposre]-[A-Za-z0-9-]{6,}"  # Slack bot/user/refresh tokens
    r"|xoxe\.[A-Za-z0-9.-]{6,}"  # Slack config tokens
    r"|xapp-[A-Za-z0-9-]{6,}"  # Slack app-level tokens
    r"|sk-(?:proj-)?[A-Za-z0-9_-]{12,}"  # OpenAI-style keys
    r"|\bt-[A-Za-z0-9_]{20,}"  # Feishu tenant access tokens
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,})"
)
# Bounded repeats: a long run of letters must not cost quadratic time (a pasted 400 kB value).
_URL_PASSWORD = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]{0,30}://)(?P<user>[^:/@\s]{0,256}):(?P<pw>[^@/\s]{1,512})@", re.I)
_MIN_SECRET_LEN = 6
# Shorter texts are scanned faster than they are looked up; longer ones would make the cache large.
_CACHED_LENGTHS = range(64, 4_097)
_CACHE_ENTRIES = 256  # at most a few MB of remembered text


class Redactor:
    """Replaces secrets in strings and nested JSON-like values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register exact secret values (short or empty values are ignored: they would mask noise)."""
        found = {s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}
        self._secrets = tuple(sorted(set(self._secrets) | found, key=len, reverse=True))
        # A new cache for the new secrets: a scan still running with the old ones fills the old cache.
        self._remembered = functools.lru_cache(maxsize=_CACHE_ENTRIES)(functools.partial(_scan, self._secrets))

    @property
    def known(self) -> tuple[str, ...]:
        """The exact secret values registered so far."""
        return self._secrets

    def redact_text(self, text: str) -> str:
        text = str(text)  # a translatable sentence renders in the current language first
        return self._remembered(text) if len(text) in _CACHED_LENGTHS else _scan(self._secrets, text)

    def redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        return value


def _scan(secrets: tuple[str, ...], text: str) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _TOKEN_SHAPES.sub(MASK, text)
