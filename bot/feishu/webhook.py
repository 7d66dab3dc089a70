"""Feishu webhook authenticity: signature, freshness, decryption, verification token.

`open_envelope` turns one raw HTTP request into a trusted JSON payload or raises `Rejected`
with a 4xx status. It runs before anything else looks at the body, and it replaces the SDK's
`EventDispatcherHandler.do`, which (1.7.5) answers 500 with the exception text, compares the
signature with `!=`, never checks the timestamp, and accepts plaintext although an encrypt key
is configured. The rules, in order:

1. With an encrypt key, a request is *authenticated before anything is decrypted*:
   - Signed (`X-Lark-Request-Timestamp`/`-Nonce`/`X-Lark-Signature` all present): the timestamp
     must be within 5 minutes and `sha256(timestamp + nonce + encrypt_key + raw_body)` must equal
     the signature (constant time); only then is the body parsed (`{"encrypt": ...}`, else 400)
     and decrypted (AES-256-CBC, key = sha256(encrypt_key), IV = first 16 bytes, PKCS#7).
   - Unsigned (none of the three headers): only the URL-verification challenge, which Feishu
     does not sign, is accepted. Every failure on this path - oversize, bad JSON, bad base64,
     bad padding, bad inner JSON, not a challenge, wrong token - raises the one `UNSIGNED`
     rejection, so the answer (status and body) never tells an attacker anything about the
     plaintext: there is no padding oracle. The unsigned path runs the same steps whatever
     fails (padding checked in constant time, JSON parsed regardless) and only looks at bodies
     of at most `CHALLENGE_MAX_BYTES`.
   - Partly signed: 401.
2. With a verification token configured, the payload's token (`header.token`, or `token` for
   the challenge and v1 events) must be present and equal (constant time). Without one, the
   request must have been signed: an unconfigured token never lets a missing token through.
3. Without an encrypt key, only the token authenticates; a stale timestamp header is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from Crypto.Cipher import AES

MAX_SKEW_SECONDS = 300
CHALLENGE_MAX_BYTES = 1024  # Feishu's encrypted challenge is about 200 bytes
TIMESTAMP_HEADER = "X-Lark-Request-Timestamp"
NONCE_HEADER = "X-Lark-Request-Nonce"
SIGNATURE_HEADER = "X-Lark-Signature"
_SIGNATURE_HEADERS = (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)


class Rejected(Exception):
    """The request is not a genuine, fresh Feishu request; answer `status` and do nothing."""

    def __init__(self, status: int, reason: str, *, signed: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.signed = signed  # the request was authentic: the refusal is audited


UNSIGNED = Rejected(401, "the request is not signed")  # the one answer to every unsigned failure


@dataclass(frozen=True)
class Envelope:
    """A verified request: the decrypted payload, or the challenge to echo."""

    payload: dict[str, Any]

    @property
    def challenge(self) -> str | None:
        if self.payload.get("type") != "url_verification":
            return None
        value = self.payload.get("challenge")
        return value if isinstance(value, str) else ""


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """Feishu's request signature: sha256 hex of timestamp + nonce + encrypt key + raw body."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def _ciphertext(encrypted: str) -> bytes:
    try:
        raw = base64.b64decode(encrypted, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(400, "ciphertext is not base64") from None
    if len(raw) < 32 or len(raw) % AES.block_size:
        raise Rejected(400, "ciphertext has a bad length")
    return raw


def _unpad(encrypt_key: str, raw: bytes) -> tuple[bytes, bool]:
    """Decrypt and strip PKCS#7; the padding is checked in constant time and never raises."""
    key = hashlib.sha256(encrypt_key.encode()).digest()
    plain = AES.new(key, AES.MODE_CBC, raw[:16]).decrypt(raw[16:])
    pad = plain[-1]
    length = pad if 1 <= pad <= AES.block_size else AES.block_size
    ok = hmac.compare_digest(plain[-length:], bytes([pad]) * length) and length == pad
    return plain[:-length], ok


def decrypt(encrypt_key: str, encrypted: str) -> bytes:
    """AES-256-CBC with key sha256(encrypt_key) and the IV in the first 16 bytes; PKCS#7.

    Only for authenticated requests: the distinct errors would be an oracle otherwise.
    """
    plain, ok = _unpad(encrypt_key, _ciphertext(encrypted))
    if not ok:
        raise Rejected(400, "ciphertext does not decrypt")
    return plain


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    value = _parse(data)
    if not isinstance(value, dict):
        raise Rejected(400, f"{what} is not a JSON object")
    return value


def _fresh(timestamp: str, now: float) -> None:
    try:
        sent = int(timestamp)
        stale = abs(now - sent) > MAX_SKEW_SECONDS
    except (ValueError, OverflowError):
        raise Rejected(401, "timestamp is malformed") from None
    if stale:
        raise Rejected(401, "timestamp is outside the 5-minute window")


def _token_of(payload: dict[str, Any]) -> Any:
    header = payload.get("header")
    if isinstance(header, dict) and "token" in header:
        return header.get("token")
    return payload.get("token")


def _token_matches(expected: str, payload: dict[str, Any]) -> bool:
    got = _token_of(payload)
    return isinstance(got, str) and hmac.compare_digest(got.encode(), expected.encode())


def _check_token(expected: str, payload: dict[str, Any]) -> None:
    if not _token_matches(expected, payload):
        raise Rejected(401, "verification token mismatch")


def _signed(headers: Mapping[str, str], body: bytes, encrypt_key: str, now: float) -> bool:
    """True when the request is signed correctly, False when unsigned; raises when partly or badly signed."""
    present = [headers.get(name) for name in _SIGNATURE_HEADERS]
    if all(value is None for value in present):
        return False
    timestamp, nonce, sent = present
    if timestamp is None or nonce is None or sent is None:
        raise Rejected(401, "signature headers are incomplete")
    _fresh(timestamp, now)
    expected = signature(timestamp, nonce, encrypt_key, body)
    if not hmac.compare_digest(expected.encode(), sent.encode("utf-8", "replace")):
        raise Rejected(401, "signature mismatch")
    return True


def _signed_payload(body: bytes, encrypt_key: str) -> dict[str, Any]:
    encrypted = _json_object(body, "body").get("encrypt")
    if not isinstance(encrypted, str) or not encrypted:
        raise Rejected(400, "an encrypted body was expected")
    return _json_object(decrypt(encrypt_key, encrypted), "decrypted body")


def _challenge(body: bytes, encrypt_key: str, verification_token: str | None) -> dict[str, Any]:
    """The unsigned URL-verification challenge, or `UNSIGNED` whatever is wrong with it."""
    outer = _parse(body[:CHALLENGE_MAX_BYTES])
    encrypted = outer.get("encrypt") if isinstance(outer, dict) else None
    try:
        raw = _ciphertext(encrypted if isinstance(encrypted, str) else "")
    except Rejected:
        raw = bytes(32)
    plain, padded = _unpad(encrypt_key, raw)
    payload = _parse(plain)
    valid = len(body) <= CHALLENGE_MAX_BYTES and isinstance(encrypted, str) and padded
    valid = valid and isinstance(payload, dict) and Envelope(payload).challenge is not None
    valid = valid and (verification_token is None or _token_matches(verification_token, payload))
    if not valid or not isinstance(payload, dict):
        raise UNSIGNED
    return payload


def open_envelope(
    headers: Mapping[str, str],
    body: bytes,
    *,
    encrypt_key: str | None,
    verification_token: str | None,
    now: float,
) -> Envelope:
    """Verify and decrypt one webhook request. Raises `Rejected` (4xx) on anything doubtful."""
    if not encrypt_key and not verification_token:
        raise Rejected(401, "no Feishu encrypt key or verification token is configured")
    if encrypt_key:
        if not _signed(headers, body, encrypt_key, now):
            return Envelope(_challenge(body, encrypt_key, verification_token))
        try:
            payload = _signed_payload(body, encrypt_key)
        except Rejected as exc:
            raise Rejected(exc.status, exc.reason, signed=True) from None
        if verification_token and not _token_matches(verification_token, payload):
            raise Rejected(401, "verification token mismatch", signed=True)
        return Envelope(payload)
    timestamp = headers.get(TIMESTAMP_HEADER)
    if timestamp is not None:
        _fresh(timestamp, now)
    payload = _json_object(body, "body")
    _check_token(verification_token or "", payload)  # set: checked on entry
    return Envelope(payload)
