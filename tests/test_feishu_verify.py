"""`bot.feishu.webhook.open_envelope` against requests built exactly as Feishu builds them."""

from __future__ import annotations

import base64
import json
import sys
import time

import pytest
from Crypto.Cipher import AES

from bot.feishu.webhook import UNSIGNED, Rejected, decrypt, open_envelope, signature
from tests.feishu_helpers import ENCRYPT_KEY, TOKEN, at_bot, encrypt, sign, wire

NOW = time.time()


@pytest.fixture(autouse=True)
def _now_is_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOW as the test starts (a long suite can run this module minutes after importing it)."""
    monkeypatch.setattr(sys.modules[__name__], "NOW", time.time())


def opened(
    body: bytes, headers: dict[str, str], *, key: str | None = ENCRYPT_KEY, token: str | None = TOKEN, now: float | None = None
):
    return open_envelope(headers, body, encrypt_key=key, verification_token=token, now=NOW if now is None else now)


def refused(status: int, body: bytes, headers: dict[str, str], **kwargs) -> str:
    with pytest.raises(Rejected) as info:
        opened(body, headers, **kwargs)
    assert info.value.status == status
    return info.value.reason


def test_encrypted_and_signed_event_opens():
    payload = at_bot("create a lead")
    body, headers = wire(payload)
    assert opened(body, headers).payload == payload


def test_decrypt_matches_feishu_and_the_sdk_vector():
    assert decrypt(ENCRYPT_KEY, encrypt(b'{"a":1}')) == b'{"a":1}'
    # The vector from Feishu's "Encrypt Key" documentation (also used by lark-oapi's tests).
    assert decrypt("test key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=") == b"hello world"


def test_signature_is_sha256_of_timestamp_nonce_key_body():
    assert signature("1", "n", "k", b"{}") == sign("1", "n", b"{}", key="k")


def test_url_verification_challenge_unsigned_but_encrypted():
    challenge = {"challenge": "c-123", "token": TOKEN, "type": "url_verification"}
    body = json.dumps({"encrypt": encrypt(json.dumps(challenge).encode())}).encode()
    assert opened(body, {}).challenge == "c-123"


def test_plaintext_challenge_with_token_only_configuration():
    body = json.dumps({"challenge": "c-9", "token": TOKEN, "type": "url_verification"}).encode()
    assert opened(body, {}, key=None).challenge == "c-9"


def test_forged_signature_refused():
    body, headers = wire(at_bot("x"))
    headers["X-Lark-Signature"] = sign(headers["X-Lark-Request-Timestamp"], headers["X-Lark-Request-Nonce"], body, key="wrong")
    assert refused(401, body, headers) == "signature mismatch"


def test_body_changed_after_signing_refused():
    _body, headers = wire(at_bot("x"))
    other, _ = wire(at_bot("y"))
    refused(401, other, headers)


def test_missing_signature_refused_for_events():
    body, headers = wire(at_bot("x"))
    refused(401, body, {})
    del headers["X-Lark-Signature"]
    refused(401, body, headers)


@pytest.mark.parametrize("skew", [-301, 301, 3600])
def test_stale_or_future_timestamp_refused(skew):
    body, headers = wire(at_bot("x"), timestamp=int(NOW) + skew)
    assert "window" in refused(401, body, headers)


def test_timestamp_edge_of_window_accepted():
    body, headers = wire(at_bot("x"), timestamp=int(NOW) - 299)
    assert opened(body, headers).payload["header"]["event_type"] == "im.message.receive_v1"


@pytest.mark.parametrize("timestamp", ["", "yesterday", "1.5e9", "2024-01-01 00:00:00 +0000 UTC"])
def test_malformed_timestamp_refused_with_401(timestamp):
    body, headers = wire(at_bot("x"))
    headers["X-Lark-Request-Timestamp"] = timestamp
    headers["X-Lark-Signature"] = sign(timestamp, headers["X-Lark-Request-Nonce"], body)
    refused(401, body, headers)


def test_wrong_or_missing_token_refused():
    payload = at_bot("x")
    payload["header"]["token"] = "not-the-token"
    refused(401, *wire(payload))
    del payload["header"]["token"]
    refused(401, *wire(payload))


def test_unconfigured_token_does_not_let_a_missing_token_pass_unsigned():
    payload = at_bot("x")
    del payload["header"]["token"]
    body, headers = wire(payload, key=None)
    refused(401, body, headers, key=None, token=None)
    refused(401, body, headers, key=None, token=TOKEN)


def signed(body: bytes) -> dict[str, str]:
    """Headers that sign `body` correctly with the bot's encrypt key."""
    ts = str(int(NOW))
    return {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": "n1", "X-Lark-Signature": sign(ts, "n1", body)}


def refused_unsigned(body: bytes) -> None:
    """Without signature headers, every failure is the one identical rejection."""
    with pytest.raises(Rejected) as info:
        opened(body, {})
    assert info.value is UNSIGNED


def test_plaintext_refused_when_an_encrypt_key_is_configured():
    body, headers = wire(at_bot("x"), key=None)
    assert refused(400, body, signed(body)) == "an encrypted body was expected"
    assert refused(401, body, headers) == "signature headers are incomplete"
    refused_unsigned(body)


@pytest.mark.parametrize(
    "ciphertext",
    [
        "not base64!!",
        base64.b64encode(b"short").decode(),
        base64.b64encode(b"x" * 33).decode(),
        base64.b64encode(b"\0" * 48).decode(),
    ],
)
def test_bad_ciphertext_refused_with_400_when_signed(ciphertext):
    body = json.dumps({"encrypt": ciphertext}).encode()
    refused(400, body, signed(body))
    refused_unsigned(body)


def test_ciphertext_of_non_json_refused():
    body = json.dumps({"encrypt": encrypt(b"\xff\xfe not json")}).encode()
    refused(400, body, signed(body))
    refused_unsigned(body)


def test_ciphertext_under_another_key_refused():
    key = b"0" * 32
    raw = AES.new(key, AES.MODE_CBC, b"1" * 16).encrypt(b'{"type":"x"}' + bytes([4]) * 4)
    body = json.dumps({"encrypt": base64.b64encode(b"1" * 16 + raw).decode()}).encode()
    refused(400, body, signed(body))
    refused_unsigned(body)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b'"text"', b"\xff", b"[" * 100_000])
def test_malformed_json_refused_with_400(body):
    refused(400, body, signed(body))
    refused_unsigned(body)
    refused(400, body, {}, key=None)


def test_unsigned_events_are_refused_like_any_unsigned_failure():
    body, _headers = wire(at_bot("x"))
    refused_unsigned(body)  # a genuine encrypted event, but unsigned: not decrypted, not answered differently


def test_unsigned_challenge_needs_the_right_token_and_a_small_body():
    challenge = {"challenge": "c-1", "token": "wrong", "type": "url_verification"}
    refused_unsigned(json.dumps({"encrypt": encrypt(json.dumps(challenge).encode())}).encode())
    challenge = {"challenge": "c" * 2000, "token": TOKEN, "type": "url_verification"}
    refused_unsigned(json.dumps({"encrypt": encrypt(json.dumps(challenge).encode())}).encode())


@pytest.mark.parametrize("timestamp", ["9" * 400, "-" + "9" * 400, "1e999", "\u0661\u0662"])
def test_absurd_timestamps_refused_with_401(timestamp):
    body, headers = wire(at_bot("x"))
    headers["X-Lark-Request-Timestamp"] = timestamp
    headers["X-Lark-Signature"] = sign(timestamp, headers["X-Lark-Request-Nonce"], body)
    refused(401, body, headers)


def test_nothing_configured_refuses_everything():
    body, headers = wire(at_bot("x"), key=None)
    refused(401, body, headers, key=None, token=None)


def test_token_only_mode_still_refuses_a_stale_timestamp():
    body, headers = wire(at_bot("x"), key=None, timestamp=int(NOW) - 600)
    refused(401, body, headers, key=None)
    body, headers = wire(at_bot("x"), key=None)
    assert opened(body, headers, key=None).payload["event"]["message"]["chat_type"] == "group"


def test_incomplete_signature_headers_refused():
    body, headers = wire(at_bot("x"))
    del headers["X-Lark-Request-Nonce"]
    assert refused(401, body, headers) == "signature headers are incomplete"
