"""Sentences a tool shows people (a card's summary and preview lines), and what lets the app
translate them.

Tools write English and never translate. A toolset declares each of its sentences once, as a
module constant: `NEW_LEAD = Sentence("crm.NEW_LEAD", "No lead has this e-mail: will create a new lead.")`.
Calling it with its values gives a `Phrase`: a `str` holding the English, which also carries its
key and values. The app renders a phrase in the reader's language from its catalogues
(`bot.core.i18n.localised`, msgctxt `tool:<key>`); everything else that reads it (the model, the
audit log, the check that a preview is unchanged) sees the English.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Joined", "Phrase", "Sentence", "all_sentences"]

_SENTENCES: dict[str, Sentence] = {}


class Phrase(str):
    """One tool sentence with its values filled in: the English as the `str`."""

    key: str
    template: str
    values: dict[str, Any]

    def __new__(cls, key: str, template: str, values: dict[str, Any]) -> Phrase:
        obj = super().__new__(cls, template.format(**values))
        obj.key, obj.template, obj.values = key, template, values
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Phrase, (self.key, self.template, self.values))


class Joined(str):
    """Several phrases (or plain texts) in a row, separated by `", "`: the value of a placeholder that
    lists things, translated part by part."""

    parts: tuple[str, ...]

    def __new__(cls, parts: Sequence[str]) -> Joined:
        obj = super().__new__(cls, ", ".join(parts))
        obj.parts = tuple(parts)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Joined, (self.parts,))


class Sentence:
    """A tool's sentence in English, with `{name}` placeholders; `sentence(name=...)` fills them."""

    key: str
    english: str

    def __init__(self, key: str, english: str) -> None:
        known = _SENTENCES.get(key)
        if known is not None and known.english != english:
            raise ValueError(f"two tool sentences share the key {key!r}")
        self.key, self.english = key, english
        _SENTENCES[key] = self

    def __call__(self, **values: Any) -> Phrase:
        return Phrase(self.key, self.english, values)

    def __repr__(self) -> str:
        return f"Sentence({self.key})"


def all_sentences() -> dict[str, Sentence]:
    """Every tool sentence declared so far (by the toolsets imported), by key."""
    return dict(_SENTENCES)
