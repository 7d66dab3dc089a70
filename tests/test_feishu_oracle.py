"""The Feishu webhook is no padding oracle: unsigned encrypted bodies are authenticated before
anything about their plaintext can show in the answer.

Thousands of unsigned bodies of each failure kind (bad base64, bad padding, padding probes on a
captured event, bad inner JSON, a wrong token, a genuine event that is not a challenge, oversize)
get byte-identical answers (status, content type, body), and nothing happens. The only unsigned
request ever answered otherwise is a URL-verification challenge that decrypts correctly and
carries the right token. CHATOPS_SLOW=1 sends ten times as many.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random

import aiohttp

from tests.feishu_helpers import TOKEN, at_bot, encrypt, fake_feishu, feishu_bot
from tests.test_feishu_webhook import assert_no_side_effects

__all__ = ["fake_feishu", "feishu_bot"]

PER_KIND = 20_000 if os.environ.get("CHATOPS_SLOW") == "1" else 2_000
HEADERS = {"Content-Type": "application/json"}


def _body(ciphertext: bytes | str) -> bytes:
    text = ciphertext if isinstance(ciphertext, str) else base64.b64encode(ciphertext).decode()
    return json.dumps({"encrypt": text}).encode()


def _captured() -> bytes:
    """A genuine encrypted event, as an attacker would capture it off the wire."""
    return base64.b64decode(encrypt(json.dumps(at_bot("the secret plan")).encode()))


def _padding_probe(rng: random.Random, captured: bytes) -> bytes:
    """The classic attack: vary the block before the last one, keep the last (mostly bad padding)."""
    blocks = max(2, rng.randrange(2, len(captured) // 16 + 1))
    cut = bytearray(captured[: blocks * 16])
    position = len(cut) - 32 + rng.randrange(16)
    cut[position] = rng.randrange(256)
    return _body(bytes(cut))


def _challenge(token: str, challenge: str = "c-1") -> dict[str, str]:
    return {"challenge": challenge, "token": token, "type": "url_verification"}


KINDS = {
    "bad base64": lambda rng, cap: _body("%" * rng.randrange(1, 200)),
    "bad length": lambda rng, cap: _body(rng.randbytes(rng.randrange(1, 200) * 16 + rng.randrange(1, 16))),
    "random ciphertext": lambda rng, cap: _body(rng.randbytes(16 * rng.randrange(2, 20))),
    "padding probe": _padding_probe,
    "valid padding, bad JSON": lambda rng, cap: _body(encrypt(rng.randbytes(rng.randrange(0, 64)).replace(b"{", b"x"))),
    "valid JSON, wrong token": lambda rng, cap: _body(encrypt(json.dumps(_challenge(f"guess-{rng.random()}")).encode())),
    "genuine event, unsigned": lambda rng, cap: _body(encrypt(json.dumps(at_bot(f"hi {rng.random()}")).encode())),
    "bad outer JSON": lambda rng, cap: rng.choice([b"{", b"[]", b"null", b'{"encrypt": 5}', rng.randbytes(40)]),
}


async def _answers(bot, bodies: list[bytes]) -> set[tuple[int, str, bytes]]:
    gate = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, body: bytes) -> tuple[int, str, bytes]:
        async with gate, session.post(bot.events_url, data=body, headers=HEADERS) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.read()

    async with aiohttp.ClientSession() as session:
        return set(await asyncio.gather(*(one(session, body) for body in bodies)))


async def test_every_unsigned_failure_gets_one_identical_answer(feishu_bot, model):
    bot = await feishu_bot()
    before = len(bot.fake.calls)
    rng, captured = random.Random(10), _captured()
    answers = {kind: await _answers(bot, [make(rng, captured) for _ in range(PER_KIND)]) for kind, make in KINDS.items()}
    oversize = _body(encrypt(json.dumps(_challenge(TOKEN, "c" * 2000)).encode()))
    answers["oversize challenge"] = await _answers(bot, [oversize] * 50)
    distinct = set().union(*answers.values())
    assert len(distinct) == 1, {kind: sorted(a) for kind, a in answers.items()}
    status, _type, body = distinct.pop()
    assert status == 401 and json.loads(body) == {"msg": "the request is not signed"}
    await assert_no_side_effects(bot, model, before)


async def test_only_a_valid_challenge_is_answered(feishu_bot, model):
    bot = await feishu_bot()
    good = _body(encrypt(json.dumps(_challenge(TOKEN, "ch-7")).encode()))
    assert await _answers(bot, [good]) == {(200, "application/json; charset=utf-8", b'{"challenge": "ch-7"}')}
    rng = random.Random(7)
    raw = bytearray(base64.b64decode(json.loads(good)["encrypt"]))
    mutated = []
    for _ in range(500):  # any bit flipped: the ciphertext no longer decrypts to this challenge
        copy = bytearray(raw)
        copy[rng.randrange(16, len(copy))] ^= 1 << rng.randrange(8)
        mutated.append(_body(bytes(copy)))
    refused = await _answers(bot, mutated)
    assert {status for status, _, _ in refused} == {401}
    assert len(refused) == 1
