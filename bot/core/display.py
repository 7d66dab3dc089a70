"""Neutralising values for the approval card: what the approver reads is what the tool gets.

`show` turns any argument text into a display form with nothing hidden and nothing forged:
- invisible and format characters (Unicode Cc, Cf, Cs, Co, Cn, Zl, Zp, variation selectors,
  blank letters) become visible escapes such as `⟨U+202E⟩`, runs as `⟨40 × U+200B⟩`;
- whitespace runs that could push text out of sight become `⟨700 spaces⟩`, `⟨12 line breaks⟩`,
  and whitespace at either end of a value is always marked; in a multi-line value, three or more
  lines in a row that hold only spaces and tabs become one line `⟨100 blank lines: ␠|␠|…⟩` (each
  line's blanks spelled out: `␠` a space, `⇥` a tab);
- in one-line fields a newline is `⏎`, so a value can never start a card line of its own;
- a non-ASCII domain in an e-mail address or a URL is shown in punycode: `⟨IDN xn--exmple-4nf.com⟩`.
The escape brackets `⟨` and the `⏎` sign are themselves escaped when a value contains them, so
every marker is unambiguous and `unshow` recovers the exact value. `findings` names what was
neutralised, for the card's warning lines. Platform markup (mrkdwn, Feishu markdown) is the
renderers' job; the text produced here is meant to be shown as plain text.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass, field

import idna
from confusable_homoglyphs import categories

OPEN, CLOSE, NEWLINE_SIGN = "⟨", "⟩", "⏎"
RUN_LIMIT = 8  # this many equal blanks in a row are collapsed into one marker
BLANK_LINES_LIMIT = 3  # this many line breaks in a row are collapsed
BIDI = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
)
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Characters of other categories that draw nothing (blank letters, fillers, selectors).
_BLANK_EXTRAS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0")
_SPECIAL = frozenset({OPEN, NEWLINE_SIGN})
_WHITESPACE_NAMES = {" ": ("space", "spaces"), "\t": ("tab", "tabs")}
# `local@domain` and `scheme://[user@]host`: the domain or host is checked for look-alikes.
_DOMAIN = re.compile(
    r"(?:(?<=@)|(?<=://))(?P<host>[^\s@<>()\[\],;:\"'/?#|*`]+\.[^\s@<>()\[\],;:\"'/?#|*`]*[^\s@<>()\[\],;:\"'/?#|*`.])"
)
# In a multi-line value: lines between two line breaks that hold only spaces and tabs, at least one
# of them not empty (empty lines alone are a run of line breaks).
_BLANK_LINES = re.compile(rf"\n((?:[ \t]*\n){{{BLANK_LINES_LIMIT},}})")
_SPELLED = {" ": "␠", "\t": "⇥"}
_MARKER = re.compile(
    r"\n⟨(?P<blank_lines>\d+) blank lines: (?P<spelled>[␠⇥|]*)⟩\n"
    r"|\n⟨(?P<lines_ml>\d+) line breaks⟩\n"
    r"|⟨(?P<lines>\d+) line breaks⟩"
    r"|⏎"
    r"|⟨(?P<ws>\d+) (?P<ws_name>spaces?|tabs?)⟩"
    r"|⟨tab⟩"
    r"|⟨(?:(?P<times>\d+) × )?U\+(?P<code>[0-9A-F]{4,6})⟩"
    r"|⟨IDN (?P<idn>[^⟩]*)⟩"
    r"|⟨empty⟩"
)


@dataclass
class Findings:
    """What `show` neutralised in one value (for the card's warning lines)."""

    bidi: set[str] = field(default_factory=set)
    invisible: set[str] = field(default_factory=set)
    collapsed: bool = False
    domains: list[str] = field(default_factory=list)  # warnings about look-alike or non-ASCII domains

    def merge(self, other: Findings) -> None:
        self.bidi |= other.bidi
        self.invisible |= other.invisible
        self.collapsed = self.collapsed or other.collapsed
        self.domains += [d for d in other.domains if d not in self.domains]

    @property
    def any(self) -> bool:
        return bool(self.bidi or self.invisible or self.domains)


def code(char: str) -> str:
    return f"U+{ord(char):04X}"


def is_hidden(char: str) -> bool:
    """Does this character draw nothing, or change how its neighbours are drawn?"""
    if char in _BLANK_EXTRAS or "\ufe00" <= char <= "\ufe0f" or "\U000e0100" <= char <= "\U000e01ef":
        return True
    return unicodedata.category(char) in _HIDDEN_CATEGORIES


def _escape(char: str, count: int) -> str:
    return f"{OPEN}{code(char)}{CLOSE}" if count == 1 else f"{OPEN}{count} × {code(char)}{CLOSE}"


def _run(char: str, count: int, *, edge: bool, one_line: bool, found: Findings) -> str:
    """The display of `count` copies of `char` in a row."""
    if char == "\n":
        if one_line:
            return NEWLINE_SIGN if count == 1 else f"{OPEN}{count} line breaks{CLOSE}"
        if count >= BLANK_LINES_LIMIT:
            found.collapsed = True
            return f"\n{OPEN}{count} line breaks{CLOSE}\n"
        return char * count
    if char in _WHITESPACE_NAMES:
        if char == " " and not edge and count < RUN_LIMIT:
            return char * count
        found.collapsed = found.collapsed or count >= RUN_LIMIT
        singular, plural = _WHITESPACE_NAMES[char]
        return (
            f"{OPEN}{singular}{CLOSE}"
            if char == "\t" and count == 1
            else f"{OPEN}{count} {plural if count > 1 else singular}{CLOSE}"
        )
    if unicodedata.category(char) == "Zs":
        if not edge and count < RUN_LIMIT:
            return char * count
        found.collapsed = found.collapsed or count >= RUN_LIMIT
        return _escape(char, count)
    if is_hidden(char):
        (found.bidi if char in BIDI else found.invisible).add(code(char))
        return _escape(char, count)
    if char in _SPECIAL:
        return _escape(char, count)
    return char * count


def _plain(text: str, *, one_line: bool, found: Findings, at_start: bool, at_end: bool) -> str:
    if one_line:
        return _plain_runs(text, one_line=one_line, found=found, at_start=at_start, at_end=at_end)
    out, position = [], 0
    for match in _BLANK_LINES.finditer(text):
        lines = match[1].split("\n")[:-1]
        if not any(lines):
            continue  # only line breaks: a run of them, collapsed as such
        before = text[position : match.start()]
        out.append(_plain_runs(before, one_line=False, found=found, at_start=at_start and position == 0, at_end=False))
        spelled = "|".join("".join(_SPELLED[c] for c in line) for line in lines)
        out.append(f"\n{OPEN}{len(lines)} blank lines: {spelled}{CLOSE}\n")
        found.collapsed = True
        position = match.end()
    rest = text[position:]
    out.append(_plain_runs(rest, one_line=False, found=found, at_start=at_start and position == 0, at_end=at_end))
    return "".join(out)


def _plain_runs(text: str, *, one_line: bool, found: Findings, at_start: bool, at_end: bool) -> str:
    runs = [(char, len(list(group))) for char, group in itertools.groupby(text)]
    out = []
    for index, (char, count) in enumerate(runs):
        edge = (index == 0 and at_start) or (index == len(runs) - 1 and at_end)
        if unicodedata.category(char) == "Zs" and char != " ":  # beside other blanks, a blank of another kind
            near = [runs[i][0] for i in (index - 1, index + 1) if 0 <= i < len(runs)]  # is shown: runs of mixed
            edge = edge or any(c.isspace() or unicodedata.category(c) == "Zs" for c in near)  # blanks never pile up
        out.append(_run(char, count, edge=edge, one_line=one_line, found=found))
    return "".join(out)


def _label_ascii(label: str) -> tuple[str, bool]:
    """(A-label, valid IDN) for one non-ASCII label; raw punycode when `idna` refuses it."""
    if label.isascii():  # a literal "xn--" label: encoded too, so the marker decodes unambiguously
        return "xn--" + label.encode("punycode").decode("ascii"), False
    try:
        alabel = idna.alabel(label).decode("ascii")
        if idna.ulabel(alabel) == label:
            return alabel, True
    except (idna.IDNAError, UnicodeError, ValueError):
        pass
    return "xn--" + label.encode("punycode").decode("ascii"), False


def _domain(host: str, found: Findings) -> str:
    """A non-ASCII host as a punycode marker, with a warning naming the risk."""
    labels, valid = [], True
    for label in host.split("."):
        if label.isascii() and not label.startswith("xn--"):
            labels.append(label)
            continue
        alabel, ok = _label_ascii(label)
        labels.append(alabel)
        valid = valid and ok
    shown = ".".join(labels)
    scripts = sorted(s.title() for s in categories.unique_aliases(host) - {"COMMON", "INHERITED"})
    if len(scripts) > 1:
        why = f"mixes {' and '.join(scripts)} letters: it may imitate another domain"
    else:
        why = "is not plain ASCII: check it is the domain you expect"
    if not valid:
        why += " (it is not a valid internationalised domain name)"
    warning = f"the domain {shown} {why}"
    if warning not in found.domains:
        found.domains.append(warning)
    return f"{OPEN}IDN {shown}{CLOSE}"


_HOST_PUNCTUATION = frozenset("-._\u3002\uff0e\uff61")  # IDNA also separates labels with the last three


def _visible_prefix(host: str) -> str:
    """The host up to its first invisible or blank character (those are escaped one by one instead),
    or its first punctuation or symbol a domain cannot hold (a closing ” or an … after it)."""
    for index, char in enumerate(host):
        category = unicodedata.category(char)
        if is_hidden(char) or category == "Zs" or char in _SPECIAL:
            return host[:index]
        if category[0] in "PS" and char not in _HOST_PUNCTUATION:
            return host[:index]
    return host


def show(value: str, *, one_line: bool = True, found: Findings | None = None) -> str:
    """`value` as the approver must see it: every character accounted for, nothing hidden or forged."""
    found = found if found is not None else Findings()
    if value == "":
        return f"{OPEN}empty{CLOSE}"
    parts: list[str] = []
    position = 0
    for match in _DOMAIN.finditer(value):
        host = _visible_prefix(match["host"]).rstrip(".")
        if host.isascii() or "." not in host:
            continue
        parts.append(
            _plain(value[position : match.start()], one_line=one_line, found=found, at_start=position == 0, at_end=False)
        )
        parts.append(_domain(host, found))
        position = match.start() + len(host)
    parts.append(_plain(value[position:], one_line=one_line, found=found, at_start=position == 0, at_end=True))
    return "".join(parts)


def _from_punycode(host: str) -> str:
    return ".".join(
        label[4:].encode("ascii").decode("punycode") if label.startswith("xn--") else label for label in host.split(".")
    )


def _unmarker(match: re.Match[str]) -> str:
    text = match.group(0)
    if text == NEWLINE_SIGN:
        return "\n"
    if text == f"{OPEN}tab{CLOSE}":
        return "\t"
    if text == f"{OPEN}empty{CLOSE}":
        return ""
    if match["blank_lines"]:
        lines = ["".join(" " if c == "␠" else "\t" for c in line) for line in match["spelled"].split("|")]
        return "\n" + "\n".join(lines) + "\n"
    if match["lines_ml"] or match["lines"]:
        return "\n" * int(match["lines_ml"] or match["lines"])
    if match["ws"]:
        return (" " if match["ws_name"].startswith("space") else "\t") * int(match["ws"])
    if match["code"]:
        return chr(int(match["code"], 16)) * int(match["times"] or 1)
    return _from_punycode(match["idn"])


def unshow(shown: str) -> str:
    """The exact value behind a `show` display (every marker decoded)."""
    return _MARKER.sub(_unmarker, shown)


def inert(text: str) -> str:
    """Free text (a model's reply) for a terminal: line breaks and tabs kept, every other control or
    format character (escape sequences, carriage returns, text-direction controls) shown as `⟨U+…⟩`,
    so the text cannot move the cursor, hide a line or restyle a card printed after it."""
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) not in _HIDDEN_CATEGORIES else f"{OPEN}{code(ch)}{CLOSE}" for ch in text
    )


def one_line(value: str) -> str:
    """Short form for labels, names and reasons: `show` in one-line mode, findings discarded."""
    return show(value, one_line=True)
