"""`CardView` -> Feishu card JSON 2.0, and the `card.action.trigger` callback answer.

The card shows what Slack's shows: summary, tool, every frozen argument, warnings and preview,
the rule, the requester, the expiry and, once decided, `bot.core.cards.status_lines`. While pending
it carries a form: an optional "reject reason" input plus Approve (primary), Reject (danger) and
Edit submit buttons whose `behaviors` callback value is `{"action", "approval_id", "revision"}`
(the revision of the call shown, so a click on a card an edit replaced acts on nothing); the typed
reason arrives as `action.form_value.reject_reason`. Edit answers with the edit form card
(`edit_form_card`: a form of typed inputs, `select_static` for booleans and options, Save and
Cancel); Save sends the values as `form_value.arg_<i>` with the names in the button's value.

Everything that came from users or the model is rendered as `plain_text`, never markdown, so
nobody can inject links or `<at id=all>` into a card; values arrive neutralised by
`bot.core.display` (visible escapes, no line breaks in one-line fields) and argument lines start
with `▸`, so none can pass for the fixed lines. The only markdown is the requester line, an
`<at>` tag for a well-formed open_id. The card shows every argument shortened (saying so) and a
collapsed "Full request" panel (`collapsible_panel`) with every value complete. Feishu refuses
cards over 30 KB: `render_card` shortens the compact part until the panel has room, fills the
panel up to the limit and, when even that is not enough, says how much is missing and how to
see it (`chatops approval show <id>`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from bot.core import i18n, texts
from bot.core.approvals import DecisionOutcome, EditOutcome, EditResult
from bot.core.cards import chunks, cut, quoted, shorten, status_lines
from bot.core.channels import CardView
from bot.core.edit_form import EditField, EditForm
from bot.feishu.events import ARG_INPUT

MAX_CARD_BYTES = 28 * 1024  # Feishu's limit is 30 KB; keep a margin for the request envelope
MAX_ELEMENTS = 190  # Feishu refuses a card 2.0 of more than 200 components or elements (text elements count)
PACK_CHARS = 2000  # argument lines joined into one text element up to this many characters
NOTICE_RESERVE = 1024  # room kept for the "does not fit" notice (twice)
MIN_PANEL = 2048  # a compact card leaves at least this much for the full request
PANEL_PIECE = 1000  # characters per text element in the panel
REASON_INPUT = "reject_reason"
INPUT_LIMIT = 1000  # an input's max_length; a longer value cannot be edited on a card
_OPEN_ID = re.compile(r"ou_[0-9A-Za-z_-]{1,64}")
_SHRINK_STEPS = (300, 150, 80, 40, 10)
_COLOURS = {
    "pending": "orange",
    "approved": "blue",
    "executing": "blue",
    "succeeded": "green",
    "rejected": "red",
    "failed": "red",
    "in_doubt": "carmine",
    "expired": "grey",
    "cancelled": "grey",
}
_TOASTS = {
    "approved": "success",
    "rejected": "info",
    "vote_recorded": "info",
    "already": "warning",
    "expired": "warning",
    "not_allowed": "error",
    "not_found": "error",
    "stale": "warning",
}
_EDIT_TOASTS = {
    EditResult.EDITED: "success",
    EditResult.INVALID: "error",
    EditResult.UNCHANGED: "info",
    EditResult.NOT_ALLOWED: "error",
    EditResult.NOT_FOUND: "error",
}


def _text(content: str) -> dict[str, Any]:
    return {"tag": "div", "text": {"tag": "plain_text", "content": str(content)}}


def _button(label: str, kind: str, verb: str, approval_id: str, revision: int = 1, **extra: Any) -> dict[str, Any]:
    value = {"action": verb, "approval_id": approval_id, "revision": revision, **extra}
    return {
        "tag": "column",
        "width": "auto",
        "elements": [
            {
                "tag": "button",
                "name": verb,
                "text": {"tag": "plain_text", "content": str(label)},
                "type": kind,
                "form_action_type": "submit",
                "behaviors": [{"type": "callback", "value": value}],
            }
        ],
    }


def _decision_form(card: CardView) -> dict[str, Any]:
    return {
        "tag": "form",
        "name": "decision",
        "elements": [
            {
                "tag": "input",
                "name": REASON_INPUT,
                "required": False,
                "max_length": 500,
                "width": "fill",
                "placeholder": {"tag": "plain_text", "content": str(texts.REJECT_REASON_PROMPT)},
            },
            {
                "tag": "column_set",
                "horizontal_spacing": "8px",
                "columns": [
                    _button(texts.APPROVE, "primary", "approve", card.approval_id, card.revision),
                    _button(texts.REJECT, "danger", "reject", card.approval_id, card.revision),
                    _button(texts.EDIT, "default", "edit", card.approval_id, card.revision),
                ],
            },
        ],
    }


def _requester(card: CardView) -> dict[str, Any]:
    if card.requester == card.requester_id and _OPEN_ID.fullmatch(card.requester_id):
        who = f"<at id={card.requester_id}></at>"
        return {"tag": "markdown", "content": texts.CARD_REQUESTED_BY.format(who=who)}
    return _text(texts.CARD_REQUESTED_BY.format(who=card.requester))


def _status_line(card: CardView, line: str, limit: int) -> dict[str, Any]:
    """A decision line; "Approved by ou_…" / "Rejected by ou_…" (Feishu tells no names) with the decider
    as an `<at>` mention, which Feishu shows as their name: those two lines hold nothing else anyone typed."""
    who = card.decided_by_id
    if card.decided_by == who and who and _OPEN_ID.fullmatch(who):
        at = texts.when(card.decided_at) if card.decided_at else "?"
        mention = f"<at id={who}></at>"
        for sentence, values in ((texts.CARD_APPROVED, {"at": at}), (texts.CARD_REJECTED_NO_REASON, {})):
            if line == sentence.format(who=who, **values):
                return {"tag": "markdown", "content": sentence.format(who=mention, **values)}
    return _text(_short(line, limit * 2))


def _short(text: str, limit: int) -> str:
    return shorten(text, limit)[0]


def _compact(card: CardView, limit: int, room: int | None = None) -> tuple[list[dict[str, Any]], bool]:
    """The arguments on the card, names and values shortened to `limit`, their lines packed into as few
    text elements as fit (each line still starts with `▸`, as on Slack); and whether anything was.
    `room`: at most this many arguments, then a line saying how many more only the panel shows."""
    lines: list[str] = []
    shortened = False
    fields = card.fields if room is None else card.fields[:room]
    for field in fields:
        label, label_cut = shorten(field.label, limit)
        if field.multiline:
            value, was_cut = shorten(quoted(field.value), limit * 4)
            lines.append(f"▸ {label}:\n{value}")
        else:
            value, was_cut = shorten(field.value, limit)
            lines.append(f"▸ {label}: {value}")
        shortened = shortened or was_cut or label_cut
    if len(fields) < len(card.fields):
        lines.append("▸ " + texts.CARD_MORE_FIELDS.format(count=len(card.fields) - len(fields)))
        shortened = True
    return _packed(lines), shortened


def _packed(lines: list[str]) -> list[dict[str, Any]]:
    """`lines` joined into as few text elements as fit `PACK_CHARS` each (Feishu counts elements)."""
    packed: list[str] = []
    for line in lines:
        if packed and len(packed[-1]) + 1 + len(line) <= PACK_CHARS:
            packed[-1] += "\n" + line
        else:
            packed.append(line)
    return [_text(text) for text in packed]


def _panel(title: str, elements: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tag": "collapsible_panel",
        "element_id": "full_request",
        "expanded": False,
        "header": {"title": {"tag": "plain_text", "content": title}, "vertical_align": "center"},
        "border": {"color": "grey", "corner_radius": "5px"},
        "vertical_spacing": "4px",
        "elements": elements,
    }


def _full_elements(card: CardView) -> list[tuple[int, int, dict[str, Any]]]:
    """(characters, field index, element) for the panel: every argument's name and value complete, in pieces."""
    out: list[tuple[int, int, dict[str, Any]]] = []
    for index, field in enumerate(card.fields):
        for n, piece in enumerate(chunks(f"{field.label}:", PANEL_PIECE)):
            out.append((len(piece) if n else 0, index, {**_text(piece), "element_id": f"l{index}_{n}" if n else f"l{index}"}))
        for n, piece in enumerate(chunks(quoted(field.value) if field.multiline else field.value, PANEL_PIECE)):
            out.append((len(piece), index, {**_text(piece), "element_id": f"v{index}_{n}"}))
    return out


def element_count(node: Any) -> int:
    """Tagged objects in a card (components and their text elements), as Feishu counts toward its 200."""
    if isinstance(node, dict):
        return ("tag" in node) + sum(element_count(v) for v in node.values())
    if isinstance(node, list):
        return sum(element_count(v) for v in node)
    return 0


def _size(element: dict[str, Any]) -> int:
    return len(json.dumps(element, ensure_ascii=False).encode("utf-8")) + 1


def _build(card: CardView, limit: int, *, panel: bool = True, room: int | None = None) -> dict[str, Any]:
    fields, shortened = _compact(card, limit, room)
    elements: list[dict[str, Any]] = [_text(_short(card.summary, limit * 2)), {"tag": "hr"}, *fields]
    elements += _packed(["⚠️ " + _short(warning, limit * 2) for warning in card.warnings])
    if card.preview:
        elements.append(_text("\n".join(_short(line, limit) for line in card.preview)))
    if shortened:
        elements.append(_text(texts.CARD_FULL_FEISHU))
    if panel:
        elements.append(_panel(texts.FULL_PANEL.format(chars=sum(len(f.value) for f in card.fields)), []))
    elements.append({"tag": "hr"})
    elements.append(_text(texts.CARD_WHY.format(reason=texts.localize(card.rule) or "")))
    elements.append(_requester(card))
    elements.append(_text(texts.CARD_EXPIRES.format(at=texts.when(card.expires_at))))
    elements += [_status_line(card, line, limit) for line in status_lines(card)]
    if card.actionable:
        elements.append(_decision_form(card))
    return {
        "schema": "2.0",
        "config": {"update_multi": True, "summary": {"content": str(texts.CARD_TITLE)}},
        "header": {
            "title": {"tag": "plain_text", "content": str(texts.CARD_TITLE)},
            "subtitle": {"tag": "plain_text", "content": card.tool},
            "template": _COLOURS.get(card.status, "grey"),
        },
        "body": {"elements": elements},
    }


def _fill_panel(built: dict[str, Any], card: CardView) -> None:
    """Put as much of the full request in the panel as the size limit allows; say so if not all of it."""
    elements = built["body"]["elements"]
    panel = next(e for e in elements if e.get("tag") == "collapsible_panel")
    room = MAX_CARD_BYTES - card_size(built) - NOTICE_RESERVE
    count_room = MAX_ELEMENTS - element_count(built) - 4  # 4: the "does not fit" notice, twice
    left_out, taken = 0, []
    for chars, _, element in _full_elements(card):
        cost = _size(element)
        if left_out or cost > room or count_room < 2:
            left_out += chars
            continue
        room -= cost
        count_room -= 2  # the div and its plain_text
        taken.append(element)
    panel["elements"] = taken
    if left_out:
        notice = _text("⚠️ " + texts.FULL_TOO_LONG.format(more=left_out, approval_id=card.approval_id))
        taken.append({**notice, "element_id": "too_long"})
        elements.insert(elements.index(panel), notice)


def card_size(card: dict[str, Any]) -> int:
    """Bytes of the card as sent (`content` is the JSON string, UTF-8)."""
    return len(json.dumps(card, ensure_ascii=False).encode("utf-8"))


def render_card(card: CardView) -> dict[str, Any]:
    """The card JSON 2.0 for `card`, guaranteed under `MAX_CARD_BYTES`, with the full request in a panel."""
    room: int | None = None
    while True:
        for limit in _SHRINK_STEPS:
            with i18n.speaking(card.lang, card.tz):
                built = _build(card, limit, room=room)
            if card_size(built) <= MAX_CARD_BYTES - NOTICE_RESERVE - MIN_PANEL and element_count(built) <= MAX_ELEMENTS - 8:
                with i18n.speaking(card.lang, card.tz):
                    _fill_panel(built, card)
                return built
        if room == 0:  # unreachable with `bot.core.cards.card_content`'s caps (warnings and preview lines)
            raise ValueError(f"approval card {card.approval_id} cannot be made small enough")
        room = len(card.fields) // 2 if room is None else room // 2  # fewer arguments on the card, the rest said


def callback_response(outcome: DecisionOutcome) -> dict[str, Any]:
    """The answer to a click: a toast for the clicker, plus the current card (raw) if any.

    A refused click (not allowed) changes nothing, so it gets the toast only.
    """
    toast = {"type": _TOASTS.get(outcome.kind, "info"), "content": cut(str(outcome.message), 300)}
    response: dict[str, Any] = {"toast": toast}
    if outcome.card is not None and outcome.kind != "not_allowed":
        response["card"] = {"type": "raw", "data": render_card(outcome.card)}
    return response


def _field_input(index: int, field: EditField) -> dict[str, Any]:
    """The card 2.0 form component for one argument: a select for booleans and options, else an input."""
    base: dict[str, Any] = {
        "name": f"{ARG_INPUT}{index}",
        "required": field.required,
        "width": "fill",
        "label": {"tag": "plain_text", "content": field.name},
        "label_position": "top",
    }
    if field.kind == "boolean" or (field.kind == "enum" and field.options):
        pairs = [(str(texts.EDIT_YES), "true"), (str(texts.EDIT_NO), "false")] if field.kind == "boolean" else []
        pairs = pairs or [(o, o) for o in field.options]
        options = [{"text": {"tag": "plain_text", "content": label}, "value": value} for label, value in pairs]
        select = {**base, "tag": "select_static", "options": options}
        if field.value in {value for _, value in pairs}:
            select["initial_option"] = field.value
        return select
    element = {**base, "tag": "input", "max_length": INPUT_LIMIT, "default_value": field.value}
    if field.multiline:
        element.update(input_type="multiline_text", rows=4)
    if field.description:
        element["placeholder"] = {"tag": "plain_text", "content": field.description[:100]}
    return element


def edit_form_card(form: EditForm, lang: str | None, tz: str | None) -> dict[str, Any]:
    """The edit form, in the editor's language: every argument in a typed input, Save and Cancel."""
    with i18n.speaking(lang, tz):
        elements: list[dict[str, Any]] = [_text(f"{form.tool} · {form.approval_id}"), _text(texts.EDIT_HINT)]
        inputs: list[dict[str, Any]] = []
        names: list[str] = []
        for field in form.fields:
            if len(field.value) > INPUT_LIMIT:
                elements.append(_text(texts.EDIT_KEPT.format(field=field.name)))
                continue
            inputs.append(_field_input(len(names), field))
            names.append(field.name)
        buttons = [
            _button(texts.EDIT_SAVE, "primary", "edit_submit", form.approval_id, form.revision, fields=names),
            _button(texts.EDIT_CANCEL, "default", "edit_cancel", form.approval_id, form.revision),
        ]
        inputs.append({"tag": "column_set", "horizontal_spacing": "8px", "columns": buttons})
        elements.append({"tag": "form", "name": "edit", "elements": inputs})
        return {
            "schema": "2.0",
            "config": {"update_multi": True, "summary": {"content": str(texts.EDIT_TITLE)}},
            "header": {
                "title": {"tag": "plain_text", "content": str(texts.EDIT_TITLE)},
                "subtitle": {"tag": "plain_text", "content": form.tool},
                "template": "orange",
            },
            "body": {"elements": elements},
        }


def edit_response(outcome: EditOutcome, lang: str | None, tz: str | None) -> dict[str, Any]:
    """The answer to an Edit, Save or Cancel click: the edit form; or a toast (refusals and problems,
    the form staying as it is for problems) plus the approval card as it is now."""
    if outcome.form is not None:
        return {"card": {"type": "raw", "data": edit_form_card(outcome.form, lang, tz)}}
    response: dict[str, Any] = {}
    if outcome.message:
        problems = "; ".join(f"{name}: {problem}" if name else problem for name, problem in (outcome.errors or {}).items())
        content = f"{outcome.message} {problems}" if problems else outcome.message
        response["toast"] = {"type": _EDIT_TOASTS.get(outcome.kind, "warning"), "content": cut(content, 300)}
    if outcome.card is not None and outcome.kind not in (EditResult.INVALID, EditResult.NOT_ALLOWED):
        response["card"] = {"type": "raw", "data": render_card(outcome.card)}
    return response
