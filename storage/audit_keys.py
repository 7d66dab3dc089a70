"""The audit key ring: the HMAC keys that seal the audit chain, kept outside the database.

Keys come from `CHATOPS_AUDIT_KEY` (one key, or several separated by spaces or commas, oldest
first) or from a key file (one key per line, oldest first; created with mode 0600 at first start
with one random key). The last key is the current one: new rows are sealed with it; older keys
only verify rows written before a rotation. A key is named in the table by its `key_id`, an
HMAC of a fixed label under the key, which tells nothing about the key itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

KEY_FILE_NAME = "chatops-audit.key"
MIN_KEY_CHARS = 32
_SEPARATORS = re.compile(r"[\s,]+")


class AuditKeyError(Exception):
    """The audit key ring is missing, unreadable, too weak, or does not fit the chain."""


@functools.lru_cache(maxsize=16)  # a key ring holds a few keys; every seal and link names one
def key_id(key: bytes) -> str:
    """A public name for a key (16 hex digits); it does not reveal the key."""
    return hmac.new(key, b"chatops-audit-key-id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKeys:
    """The key ring, oldest first; the last key is the current one."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise AuditKeyError("the audit key ring is empty")

    @classmethod
    def from_text(cls, text: str, source: str) -> AuditKeys:
        parts = [p for p in _SEPARATORS.split(text.strip()) if p]
        if not parts:
            raise AuditKeyError(f"{source} holds no key")
        if any(len(p) < MIN_KEY_CHARS for p in parts):
            raise AuditKeyError(f"{source}: every audit key must be at least {MIN_KEY_CHARS} characters")
        return cls(tuple(p.encode() for p in parts))

    @property
    def current(self) -> bytes:
        return self.keys[-1]

    @property
    def current_id(self) -> str:
        return key_id(self.current)

    def by_id(self, kid: str | None) -> bytes | None:
        return next((k for k in self.keys if kid is not None and hmac.compare_digest(key_id(k), kid)), None)

    def secrets(self) -> list[str]:
        """The keys as text, for the redactor."""
        return [k.decode() for k in self.keys]


def new_key() -> str:
    return secrets.token_hex(32)


def default_key_file(database_url: str) -> Path:
    """Next to the SQLite file; in the working directory for other databases."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).resolve().with_name(KEY_FILE_NAME)
    return Path.cwd() / KEY_FILE_NAME


def _create_key_file(path: Path) -> None:
    """Write a fresh key with mode 0600; atomic, and a no-op when another process won the race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(new_key() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # fails if the file appeared meanwhile: theirs wins
    finally:
        tmp.unlink(missing_ok=True)


def load_keys(env_value: str | None, key_file: Path, *, create: bool = True) -> AuditKeys:
    """The ring from `CHATOPS_AUDIT_KEY` when set, else from `key_file` (created when absent)."""
    if env_value:
        return AuditKeys.from_text(env_value, "CHATOPS_AUDIT_KEY")
    if not key_file.exists():
        if not create:
            raise AuditKeyError(f"no audit key: set CHATOPS_AUDIT_KEY or restore the key file {key_file}")
        _create_key_file(key_file)
    try:
        text = key_file.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditKeyError(f"cannot read the audit key file {key_file} ({type(exc).__name__})") from None
    return AuditKeys.from_text(text, f"the audit key file {key_file}")


def append_key(key_file: Path) -> None:
    """Add a new current key to the key file (rotation); the old ones stay to verify older rows."""
    with key_file.open("a", encoding="ascii") as fh:
        fh.write(new_key() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
