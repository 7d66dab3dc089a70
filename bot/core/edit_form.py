"""Edit before approve, the channel-neutral part: the form and reading it back.

What belongs here: deriving an `EditForm` (one typed `EditField` per argument) from a tool's JSON
schema and the frozen arguments; turning what a person typed back into arguments (`read_values`,
every problem named by its field); the field-level diff an edit leaves in the audit trail; the
tool's preview for a call (shared with the planner). Adapters render the form in their own terms
(Slack modal, Feishu form card, terminal prompts) and hand the typed values back unchanged.

Kinds: `string`, `number`, `integer`, `boolean`, `enum` (a closed list of values), and `json` for
everything else (objects, arrays, unions), typed as JSON text. A field missing from a submission
keeps its value (a platform may leave out a value too long for its inputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from bot.core import texts
from tools.context import ToolContext
from tools.registry import PreparedCall, ToolSpec

log = logging.getLogger("chatops.edit")

KINDS = ("string", "number", "integer", "boolean", "enum", "json")
MULTILINE_AT = 120  # a string longer than this (or with a line break) gets a multi-line input
FORM_ERROR = ""  # the `errors` key of a problem that belongs to no single field
_TRUE = frozenset({"true", "yes", "y", "1", "on", "是", "真"})
_FALSE = frozenset({"false", "no", "n", "0", "off", "否", "假"})


@dataclass(frozen=True)
class EditField:
    """One argument as a typed input: `value` is its current value as text (what the input shows)."""

    name: str
    kind: str
    value: str
    required: bool = False
    description: str = ""
    options: tuple[str, ...] = ()  # enum values as text
    choices: tuple[Any, ...] = ()  # the enum values themselves, in the same order
    multiline: bool = False


@dataclass(frozen=True)
class EditForm:
    """The frozen arguments of one approval revision, as a form; `lang`/`tz` as on its card."""

    approval_id: str
    revision: int
    tool: str
    fields: tuple[EditField, ...]
    lang: str | None = None
    tz: str | None = None


def schema_of(spec: ToolSpec) -> dict[str, Any]:
    return spec.parameters_schema or spec.args_model.model_json_schema()


def _resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A property with `$ref` followed and an `Optional[...]` (`anyOf` with null) unwrapped."""
    if "$ref" in prop:
        target = defs.get(str(prop["$ref"]).rpartition("/")[2], {})
        return _resolve({**target, **{k: v for k, v in prop.items() if k != "$ref"}}, defs)
    variants = prop.get("anyOf") or prop.get("oneOf")
    if isinstance(variants, list):
        real = [v for v in variants if v.get("type") != "null"]
        if len(real) == 1:
            return _resolve({**real[0], **{k: v for k, v in prop.items() if k not in ("anyOf", "oneOf")}}, defs)
    return prop


def _kind(prop: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    if "enum" in prop:
        return "enum", tuple(prop["enum"])
    if "const" in prop:
        return "enum", (prop["const"],)
    kind = prop.get("type")
    if kind in ("string", "number", "integer", "boolean"):
        return str(kind), ()
    return "json", ()


def as_text(kind: str, value: Any) -> str:
    """A value as the text its input shows."""
    if value is None:
        return ""
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return "true" if value else "false"
    if kind == "enum" and isinstance(value, str):
        return value
    if kind in ("number", "integer") and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def build_form(approval_id: str, revision: int, spec: ToolSpec, args: dict[str, Any], **where: Any) -> EditForm:
    """The form for these frozen arguments: every schema property, in schema order, then any extra argument."""
    schema = schema_of(spec)
    defs = schema.get("$defs") or schema.get("definitions") or {}
    props: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    fields = []
    for name in [*props, *(n for n in args if n not in props)]:
        prop = _resolve(props.get(name) or {}, defs)
        kind, options = _kind(prop)
        text = as_text(kind, args.get(name, prop.get("default")))
        fields.append(
            EditField(
                name=name,
                kind=kind,
                value=text,
                required=name in required,
                description=str(prop.get("description") or "")[:300],
                options=tuple(as_text("enum", o) for o in options),
                choices=options,
                multiline=kind == "json" or (kind == "string" and (len(text) > MULTILINE_AT or "\n" in text)),
            )
        )
    return EditForm(approval_id, revision, spec.name, tuple(fields), **where)


def _read(field: EditField, text: str) -> Any:
    """One typed value; raises ValueError with the message the person sees."""
    if field.kind == "string":
        return text
    stripped = text.strip()
    if field.kind == "integer":
        try:
            return int(stripped)
        except ValueError:
            raise ValueError(texts.EDIT_NOT_INTEGER) from None
    if field.kind == "number":
        with contextlib.suppress(ValueError):
            return int(stripped)  # a whole number exactly as written: through float, 20 digits would change
        try:
            number = float(stripped)
        except ValueError:
            raise ValueError(texts.EDIT_NOT_NUMBER) from None
        if not math.isfinite(number):
            raise ValueError(texts.EDIT_NOT_NUMBER)
        return number
    if field.kind == "boolean":
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ValueError(texts.EDIT_NOT_BOOLEAN)
    if field.kind == "enum":
        for option, choice in zip(field.options, field.choices, strict=False):
            if stripped == option:
                return choice
        raise ValueError(texts.EDIT_NOT_OPTION.format(options=", ".join(field.options[:10])))
    try:
        return json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(texts.EDIT_NOT_JSON) from None


def read_values(form: EditForm, current: dict[str, Any], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The arguments a submission asks for, and the problems by field name. A field left empty is
    removed (its schema default applies; a required one is refused), a field not submitted keeps
    its current value."""
    args = dict(current)
    errors: dict[str, str] = {}
    for field in form.fields:
        if field.name not in values:
            continue
        raw = values[field.name]
        if isinstance(raw, bool):
            raw = "true" if raw else "false"
        text = "" if raw is None else str(raw)
        if text == "" if field.kind == "string" else text.strip() == "":
            if field.required:
                errors[field.name] = str(texts.EDIT_REQUIRED)
            args.pop(field.name, None)
            continue
        try:
            args[field.name] = _read(field, text)
        except ValueError as exc:
            errors[field.name] = str(exc)
    return args, errors


def schema_errors(form: EditForm, details: list[dict[str, Any]], message: str) -> dict[str, str]:
    """The registry's validation problems, each on the field it names (else on the form)."""
    names = {f.name for f in form.fields}
    errors: dict[str, str] = {}
    for detail in details or [{"field": FORM_ERROR, "problem": message}]:
        field = str(detail.get("field") or "").partition(".")[0]
        key = field if field in names else FORM_ERROR
        problem = texts.EDIT_INVALID.format(problem=str(detail.get("problem") or message)[:300])
        errors[key] = f"{errors[key]}; {problem}" if key in errors else problem
    return errors


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields an edit changed, with their values before and after (absent: None and `"absent"`)."""
    changes = []
    for name in [*before, *(n for n in after if n not in before)]:
        if name in before and name in after and before[name] == after[name]:
            continue
        change: dict[str, Any] = {"field": name, "before": before.get(name), "after": after.get(name)}
        if name not in before:
            change["added"] = True
        if name not in after:
            change["removed"] = True
        changes.append(change)
    return changes


async def preview_lines(tool_ctx: ToolContext, prepared: PreparedCall, limit: float) -> tuple[list[str], bool]:
    """The tool's code-computed preview for the card; a failing preview says so instead of blocking."""
    if prepared.spec.preview is None:
        return [], True
    try:
        lines = await asyncio.wait_for(prepared.spec.preview(tool_ctx, prepared.args), limit)
        return list(lines), True
    except Exception as exc:  # noqa: BLE001 - the card must still be shown
        log.warning("preview of %s failed: %s", prepared.spec.name, type(exc).__name__)
        return [texts.PREVIEW_UNAVAILABLE.format(error=type(exc).__name__)], False
