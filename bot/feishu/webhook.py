"""Feishu webhook authenticity: decryption, signature, verification token, freshness.

`open_envelope` turns one raw HTTP request into a trusted JSON payload or raises `Rejected`
with a 4xx status. It runs before anything else looks at the body, and it replaces the SDK's
`EventDispatcherHandler.do`, which (1.7.5) answers 500 with the exception text, compares the
signature with `!=`, never checks the timestamp, and accepts plaintext although an encrypt key
is configured. The rules, in order:

1. The body is a JSON object (else 400).
2. With an encrypt key, the body must be `{"encrypt": ...}`. When the request carries
   `X-Lark-Request-Timestamp`/`-Nonce`/`X-Lark-Signature`, the timestamp must be within
   5 minutes and `sha256(timestamp + nonce + encrypt_key + raw_body)` must equal the signature
   (constant time), both checked *before* decrypting. AES-256-CBC, key = sha256(encrypt_key),
   IV = first 16 bytes. A request without signature headers may only be the URL-verification
   challenge (Feishu does not sign it).
3. With a verification token configured, the payload's token (`header.token`, or `token` for
   the challenge and v1 events) must be present and equal (constant time). Without one, the
   request must have been signed: an unconfigured token never lets a missing token through.
4. Without an encrypt key, only the token authenticates; a stale timestamp header is refused.
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
TIMESTAMP_HEADER = "X-Lark-Request-Timestamp"
NONCE_HEADER = "X-Lark-Request-Nonce"
SIGNATURE_HEADER = "X-Lark-Signature"


class Rejected(Exception):
    """The request is not a genuine, fresh Feishu request; answer `status` and do nothing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


def decrypt(encrypt_key: str, encrypted: str) -> bytes:
    """AES-256-CBC with key sha256(encrypt_key) and the IV in the first 16 bytes; PKCS#7."""
    try:
        raw = base64.b64decode(encrypted, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(400, "ciphertext is not base64") from None
    if len(raw) < 32 or len(raw) % AES.block_size:
        raise Rejected(400, "ciphertext has a bad length")
    key = hashlib.sha256(encrypt_key.encode()).digest()
    plain = AES.new(key, AES.MODE_CBC, raw[:16]).decrypt(raw[16:])
    pad = plain[-1]
    if not 1 <= pad <= AES.block_size or plain[-pad:] != bytes([pad]) * pad:
        raise Rejected(400, "ciphertext does not decrypt")
    return plain[:-pad]


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise Rejected(400, f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise Rejected(400, f"{what} is not a JSON object")
    return value


def _fresh(timestamp: str, now: float) -> None:
    try:
        sent = int(timestamp)
    except ValueError:
        raise Rejected(401, "timestamp is malformed") from None
    if abs(now - sent) > MAX_SKEW_SECONDS:
        raise Rejected(401, "timestamp is outside the 5-minute window")


def _token_of(payload: dict[str, Any]) -> Any:
    header = payload.get("header")
    if isinstance(header, dict) and "token" in header:
        return header.get("token")
    return payload.get("token")


def _check_token(expected: str, payload: dict[str, Any]) -> None:
    got = _token_of(payload)
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), expected.encode()):
        raise Rejected(401, "verification token mismatch")


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
    outer = _json_object(body, "body")
    timestamp = headers.get(TIMESTAMP_HEADER)
    nonce = headers.get(NONCE_HEADER)
    sent_signature = headers.get(SIGNATURE_HEADER)
    signed = False
    if encrypt_key:
        encrypted = outer.get("encrypt")
        if not isinstance(encrypted, str) or not encrypted:
            raise Rejected(400, "an encrypted body was expected")
        if timestamp is not None or nonce is not None or sent_signature is not None:
            if timestamp is None or nonce is None or sent_signature is None:
                raise Rejected(401, "signature headers are incomplete")
            _fresh(timestamp, now)
            expected = signature(timestamp, nonce, encrypt_key, body)
            if not hmac.compare_digest(expected.encode(), sent_signature.encode()):
                raise Rejected(401, "signature mismatch")
            signed = True
        payload = _json_object(decrypt(encrypt_key, encrypted), "decrypted body")
    else:
        if timestamp is not None:
            _fresh(timestamp, now)
        payload = outer
    if verification_token:
        _check_token(verification_token, payload)
    envelope = Envelope(payload)
    if envelope.challenge is None and not signed:
        if encrypt_key:
            raise Rejected(401, "the request is not signed")
        if not verification_token:
            raise Rejected(401, "the request cannot be authenticated")
    return envelope
