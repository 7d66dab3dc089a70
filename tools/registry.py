"""The tool registry: typed functions behind a decorator, their schemas derived with pydantic.

A tool is an `async def f(ctx: ToolContext, <typed params>) -> str | dict | list` whose
docstring describes it. `Toolset.tool` builds a pydantic model from the signature (docstring
parameter descriptions included), so the JSON schema the model sees is never written by hand.
A tool is read-only only when declared so; everything else is a write (fail closed).
Argument checking lives here too: `ToolRegistry.prepare` turns raw model output into either a
validated `PreparedCall` or a structured error for the model.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import ErrorDetails

from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolUnavailable
from tools.phrases import Sentence

ToolHandler = Callable[..., Awaitable[Any]]
Describe = Callable[[dict[str, Any]], str]
Preview = Callable[[ToolContext, dict[str, Any]], Awaitable[list[str]]]
Check = Callable[[ToolContext, dict[str, Any]], Awaitable[None]]
RESULT_LIMIT = 16_000
RUN = Sentence("registry.RUN", "Run {tool}")  # a card's summary for a tool that describes nothing itself


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """Everything the agent and the approval flow need to know about one tool."""

    name: str
    description: str
    read_only: bool
    args_model: type[BaseModel]
    run: Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]
    source: str = "builtin"
    destructive: bool = False
    describe: Describe | None = None
    preview: Preview | None = None
    check: Check | None = None
    parameters_schema: dict[str, Any] | None = None
    nulls_are_sent: bool = False
    """True when an argument whose value is null reaches the tool as such (MCP tools: the server receives
    `null`), so the card shows it; for built-in tools null only means "not given"."""

    @cached_property
    def _openai_tool(self) -> dict[str, Any]:
        schema = self.parameters_schema or self.args_model.model_json_schema()
        schema = {k: v for k, v in schema.items() if k != "title"}
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": schema}}

    def openai_tool(self) -> dict[str, Any]:
        """The tool as sent in the Chat Completions `tools` list (computed once per tool)."""
        return self._openai_tool

    def sentence(self, args: dict[str, Any]) -> str:
        """What will happen, in plain words built by code from the arguments."""
        if self.describe is not None:
            return self.describe(args)
        return RUN(tool=self.name)


@dataclass(frozen=True)
class PreparedCall:
    """A model tool call whose name resolved and whose arguments validated."""

    spec: ToolSpec
    args: dict[str, Any]


@dataclass(frozen=True)
class CallProblem:
    """Why a model tool call could not be prepared; serialised as the tool result."""

    kind: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def as_tool_result(self) -> str:
        body: dict[str, Any] = {"error": self.kind, "message": self.message}
        if self.details:
            body["details"] = self.details
        return json.dumps(body, ensure_ascii=False)


def _args_model(fn: ToolHandler, name: str) -> tuple[type[BaseModel], str]:
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    param_docs = {p.arg_name: (p.description or "").strip() for p in doc.params}
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters.values())
    if not params or hints.get(params[0].name) is not ToolContext:
        raise TypeError(f"tool {name}: the first parameter must be `ctx: ToolContext`")
    fields: dict[str, Any] = {}
    for p in params[1:]:
        if p.name not in hints:
            raise TypeError(f"tool {name}: parameter {p.name!r} has no type hint")
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints[p.name], Field(default, description=param_docs.get(p.name) or None))
    model = create_model(f"{name}_args", __config__=ConfigDict(extra="forbid", strict=False), **fields)
    description = "\n\n".join(x for x in (doc.short_description, doc.long_description) if x)
    if not description:
        raise TypeError(f"tool {name}: a docstring is required (it is the model's description)")
    return model, description


class Toolset:
    """A named group of tools declared with `@toolset.tool(...)`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.specs: list[ToolSpec] = []

    def tool(
        self,
        *,
        read_only: bool = False,
        destructive: bool = False,
        describe: Describe | None = None,
        preview: Preview | None = None,
        check: Check | None = None,
        name: str | None = None,
    ) -> Callable[[ToolHandler], ToolHandler]:
        """Register a typed async function as a tool. Returns the function unchanged."""

        def decorate(fn: ToolHandler) -> ToolHandler:
            tool_name = name or fn.__name__
            model, description = _args_model(fn, tool_name)

            async def run(ctx: ToolContext, args: dict[str, Any]) -> Any:
                return await fn(ctx, **dict(model.model_validate(args)))

            self.specs.append(
                ToolSpec(
                    name=tool_name,
                    description=description,
                    read_only=read_only,
                    destructive=destructive,
                    args_model=model,
                    run=run,
                    source=self.name,
                    describe=describe,
                    preview=preview,
                    check=check,
                )
            )
            return fn

        return decorate


def _loc(error: ErrorDetails) -> str:
    return ".".join(str(p) for p in error.get("loc", ())) or "(arguments)"


class ToolRegistry:
    """All tools offered to the model, by name."""

    def __init__(self, specs: Iterable[ToolSpec] = ()) -> None:
        self._specs: dict[str, ToolSpec] = {}
        self._openai_tools: list[dict[str, Any]] | None = None
        for spec in specs:
            self.add(spec)

    def add(self, spec: ToolSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"two tools are named {spec.name!r}")
        self._specs[spec.name] = spec
        self._openai_tools = None

    def get(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def __iter__(self) -> typing.Iterator[ToolSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def openai_tools(self) -> list[dict[str, Any]]:
        if self._openai_tools is None:
            self._openai_tools = [spec.openai_tool() for spec in self._specs.values()]
        return self._openai_tools

    def prepare(self, name: str, raw_arguments: str | None) -> PreparedCall | CallProblem:
        """Resolve and validate one tool call from the model. Nothing runs here."""
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._specs)) or "none"
            return CallProblem("unknown_tool", f"There is no tool named {name!r}. Available tools: {known}.")
        try:
            parsed = json.loads(raw_arguments or "{}")
        except (json.JSONDecodeError, RecursionError) as exc:
            return CallProblem("malformed_arguments", f"The arguments are not valid JSON ({exc}). Send a JSON object.")
        if not isinstance(parsed, dict):
            return CallProblem("malformed_arguments", "The arguments must be a JSON object.")
        try:
            model = spec.args_model.model_validate(parsed)
        except ValidationError as exc:
            details = [{"field": _loc(e), "problem": e["msg"]} for e in exc.errors(include_url=False, include_input=False)]
            return CallProblem("invalid_arguments", f"The arguments for {name} do not match its schema.", details)
        return PreparedCall(spec, model.model_dump(mode="json"))

    async def check(self, ctx: ToolContext, call: PreparedCall) -> CallProblem | None:
        """Run the tool's own pre-approval check (addresses, domains...), before any card is shown."""
        if call.spec.check is None:
            return None
        try:
            await call.spec.check(ctx, call.args)
        except ToolError as exc:  # a check only refuses: what it says is never "in doubt" or a tool failure
            return CallProblem(exc.kind if isinstance(exc, ArgumentError | ToolUnavailable) else "invalid_arguments", exc.message)
        return None


def result_text(value: Any, limit: int = RESULT_LIMIT) -> str:
    """A tool's return value as the text the model reads, capped in size with a visible marker."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        text = text[:limit] + f"\n[... truncated: {len(text) - limit} more characters]"
    return text
