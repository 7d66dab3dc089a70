"""Which language the bot speaks with a person, decided at each entry point (a message, a click,
a command) and made current with `i18n.speak`.

In order: the language the policy file sets for the channel, workspace or tenant (`[[channels]]`);
else the person's platform locale when the adapter learnt it (Slack `users.info`); else the
request text (any Chinese character -> zh, Latin letters -> en); else the platform's default
(Feishu: Chinese; everything else: English). A click has no text: there the card's language
(its requester's) comes before the platform default, so the clicker reads the answer in the
language of the card they clicked. The choice is stored on the `User` (`lang`, `tz`), so a run,
its approvals and its cards keep it on every replica.
"""

from __future__ import annotations

import re
from dataclasses import replace

from bot.core import i18n
from bot.core.context import AppContext
from bot.core.events import User
from bot.core.policy import Policy
from storage.engine import is_transient
from storage.models import Approval
from storage.sessions import DbSession

PLATFORM_DEFAULTS = {"feishu": "zh"}
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")
_LATIN = re.compile(r"[A-Za-z]{2,}")


def detect(text: str | None) -> str | None:
    """zh when the text has Chinese characters, en when it has Latin words, else None."""
    if not text:
        return None
    if _CJK.search(text):
        return "zh"
    return "en" if _LATIN.search(text) else None


def choose(
    policy: Policy,
    user: User,
    channel_id: str | None,
    *,
    locale: str | None = None,
    text: str | None = None,
    fallback: str | None = None,
) -> str:
    """The language for `user` in this channel (see the module docstring for the order)."""
    configured = policy.channel_setup(user.platform, channel_id, user.tenant).language
    return (
        i18n.normalise(configured)
        or i18n.normalise(locale)
        or detect(text)
        or i18n.normalise(fallback)
        or PLATFORM_DEFAULTS.get(user.platform, i18n.DEFAULT_LANGUAGE)
    )


def speak_with(
    policy: Policy,
    user: User,
    channel_id: str | None,
    *,
    locale: str | None = None,
    tz: str | None = None,
    text: str | None = None,
    fallback: str | None = None,
) -> User:
    """Choose the language, make it current for this entry point, and return `user` carrying it."""
    lang = choose(policy, user, channel_id, locale=locale, text=text, fallback=fallback)
    chosen = replace(user, lang=lang, tz=tz or user.tz)
    i18n.speak(chosen.lang, chosen.tz)
    return chosen


async def card_language(ctx: AppContext, approval_id: str) -> str | None:
    """The language an approval's card is shown in (its requester's), for a click's fallback."""

    async def read(session: DbSession) -> str | None:
        approval = await session.get(Approval, approval_id)
        return (approval.requester or {}).get("lang") if approval is not None else None

    # A click waits on this (Slack gives 3 s): an ack's bound, and the default language when the
    # database does not answer in time (the decision after it says whether the click was recorded).
    try:
        return await ctx.db.run(read, read=True, urgent=True)
    except Exception as exc:
        if is_transient(exc):
            return None
        raise
