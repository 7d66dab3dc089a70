"""`chatops i18n sync | check`: keep the gettext catalogues in step with `bot.core.texts` and the
tools' sentences (`tools.phrases`, msgctxt `tool:<key>`).

`sync` rewrites each language's `.po` file (with Babel's catalogue tools) so it holds exactly those
sentences: new ones are added (English filled in for `en`, empty for the others), a
sentence whose English changed is marked fuzzy (and so not used until a translator checks it),
removed ones are dropped. `check` lists what a language still lacks; it exits 1 when anything does.
"""

from __future__ import annotations

import re
from io import BytesIO

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

from bot.core import i18n, texts
from tools.phrases import all_sentences

_PLACEHOLDER = re.compile(r"\{(\w*)[^{}]*\}")


def sources() -> dict[str, str]:
    """Every sentence a catalogue translates, by msgctxt: the bot's, then every tool's by key (the
    built-in toolsets and MCP's are imported so that theirs are declared, whatever was imported before)."""
    import tools.builtin
    import tools.mcp.specs  # declares its sentences

    tools.builtin.builtin_toolsets()
    found = {key: text.source for key, text in texts.all_texts().items()}
    found.update({i18n.TOOL_KEY + key: sentence.english for key, sentence in sorted(all_sentences().items())})
    return found


def placeholders(sentence: str) -> set[str]:
    return set(_PLACEHOLDER.findall(sentence))


def _read(lang: str) -> Catalog | None:
    path = i18n.catalogue_path(lang)
    if not path.exists():
        return None
    with path.open("rb") as stream:
        return read_po(stream, locale=lang, domain=i18n.DOMAIN)


def sync(lang: str) -> int:
    """Rewrite `lang`'s catalogue to match `texts`; returns the number of entries changed."""
    old = _read(lang)
    fresh = Catalog(
        locale=lang,
        domain=i18n.DOMAIN,
        project="chatops-agent",
        fuzzy=False,
        # the old dates: a catalogue with nothing new is written back byte for byte (the checkout stays clean)
        creation_date=old.creation_date if old else None,
        revision_date=old.revision_date if old else None,
    )
    changed = 0
    for key, source in sources().items():
        before = next((m for m in old or [] if m.context == key), None) if old else None
        string = "" if lang != "en" else source
        fuzzy = False
        if before is not None and before.string and (lang != "en" or before.id == source):
            string, fuzzy = str(before.string), before.id != source or before.fuzzy
        changed += before is None or before.id != source
        fresh.add(source, string, context=key, flags=("fuzzy",) if fuzzy else ())
    path = i18n.catalogue_path(lang)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = BytesIO()
    write_po(buffer, fresh, width=0, omit_header=False, sort_output=False)
    path.write_bytes(buffer.getvalue())
    i18n.catalogue.cache_clear()
    return changed


def problems(lang: str) -> list[str]:
    """What `lang`'s catalogue lacks: missing, untranslated, fuzzy, or with other placeholders."""
    found = i18n.catalogue(lang)
    catalogue = _read(lang)
    fuzzy = {str(m.context) for m in catalogue or [] if m.fuzzy}
    out: list[str] = []
    known = sources()
    for key, source in known.items():
        if key in fuzzy:
            out.append(f"{lang}: {key} is marked fuzzy (its English changed)")
        elif key not in found:
            out.append(f"{lang}: {key} is not translated")
        elif placeholders(found[key]) != placeholders(source):
            out.append(f"{lang}: {key} has placeholders {sorted(placeholders(found[key]))}, not {sorted(placeholders(source))}")
    out += [f"{lang}: {key} is not a sentence of bot.core.texts or a tool" for key in found if key not in known]
    return out
