"""The bot's two languages: the current language and time zone, the gettext catalogues, and
`Text`, a sentence that renders in the current language.

- The current language lives in a `ContextVar`: each entry point (a message's run, a click, a
  command) calls `speak(lang, tz)` and every task spawned from there inherits it.
- Catalogues are gettext `.po` files (`locales/<lang>/LC_MESSAGES/chatops.po`), read at runtime
  with Babel (no compile step). Each entry's `msgctxt` is the constant's name in `texts`, its
  `msgid` the English source sentence, its `msgstr` the sentence in that language.
- `Text` is a `str` (the English source) whose `str()`, f-string and `.format()` render the
  translation, so `texts.NAME` and `texts.NAME.format(...)` keep working everywhere. Code that
  serialises a `Text` directly (JSON, SQL) gets the English source: render it with `str()` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from babel.dates import format_datetime, get_timezone
from babel.messages.pofile import read_po

from tools.phrases import Joined, Phrase

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"
DOMAIN = "chatops"
TOOL_KEY = "tool:"  # the msgctxt of a tool's sentence (`tools.phrases`) is this and its key
LOCALES = Path(__file__).parent / "locales"
_DATE_PATTERNS = {"en": "yyyy-MM-dd HH:mm z", "zh": "yyyy年M月d日 HH:mm z"}

_language: ContextVar[str] = ContextVar("chatops_language", default=DEFAULT_LANGUAGE)
_timezone: ContextVar[str | None] = ContextVar("chatops_timezone", default=None)


def normalise(locale: str | None) -> str | None:
    """One of `LANGUAGES` for a platform locale (`zh-CN`, `zh_Hans`, `en-US`, `zh`...), else None."""
    if not locale:
        return None
    base = re.split(r"[-_]", locale.strip().lower(), maxsplit=1)[0]
    return base if base in LANGUAGES else None


def current() -> str:
    """The language the bot speaks in this context."""
    return _language.get()


def current_timezone() -> str | None:
    return _timezone.get()


def speak(lang: str | None, tz: str | None = None) -> None:
    """Make `lang` (and the reader's time zone) current for this context and the tasks it spawns."""
    _language.set(normalise(lang) or DEFAULT_LANGUAGE)
    _timezone.set(tz)


@contextmanager
def speaking(lang: str | None, tz: str | None = None) -> Iterator[None]:
    """`speak` for a block only (rendering one card in its requester's language)."""
    tokens = (_language.set(normalise(lang) or DEFAULT_LANGUAGE), _timezone.set(tz))
    try:
        yield
    finally:
        _language.reset(tokens[0])
        _timezone.reset(tokens[1])


def catalogue_path(lang: str) -> Path:
    return LOCALES / lang / "LC_MESSAGES" / f"{DOMAIN}.po"


@cache
def catalogue(lang: str) -> dict[str, str]:
    """`{constant name: sentence}` of one language, read once from its `.po` file."""
    with catalogue_path(lang).open("rb") as stream:
        parsed = read_po(stream, locale=lang, domain=DOMAIN)
    return {str(m.context): str(m.string) for m in parsed if m.id and m.context and m.string and not m.fuzzy}


class Text(str):
    """A sentence of the bot: the English source as a `str`, rendered in the current language."""

    key: str

    def __new__(cls, key: str, english: str) -> Text:
        obj = super().__new__(cls, english)
        obj.key = key
        return obj

    @property
    def source(self) -> str:
        return str.__str__(self)

    def render(self, lang: str | None = None) -> str:
        return catalogue(lang or current()).get(self.key) or self.source

    def __str__(self) -> str:
        return self.render()

    def __format__(self, spec: str) -> str:
        return format(self.render(), spec)

    def format(self, *args: Any, **kwargs: Any) -> str:
        return self.render().format(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Text({self.key})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Text, (self.key, self.source))


def localised(text: str) -> str:
    """A tool's sentence (`tools.phrases.Phrase`, `Joined`) in the current language, with its values
    translated too; any other text as it is. A translation that does not fit its values gives the English."""
    if isinstance(text, Joined):
        return ", ".join(localised(part) for part in text.parts)
    if not isinstance(text, Phrase):
        return text
    template = catalogue(current()).get(TOOL_KEY + text.key) or text.template
    values = {name: localised(value) if isinstance(value, str) else value for name, value in text.values.items()}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError):
        return str.__str__(text)


def when(at: datetime) -> str:
    """A timestamp as the reader reads it: their language, their time zone when known (else UTC)."""
    lang = current()
    try:
        tz = get_timezone(current_timezone() or "UTC")
    except LookupError:
        tz = get_timezone("UTC")
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return format_datetime(at, _DATE_PATTERNS[lang], tzinfo=tz, locale=lang)
