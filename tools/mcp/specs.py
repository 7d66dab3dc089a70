"""From a tool an MCP server lists to a `ToolSpec`: its name, its classification, its arguments, its result.

Classification fails closed. A tool is read-only only when the server says `readOnlyHint: true`
*and* the operator marked the server `trusted` (hints from an untrusted server are claims by a
third party, and the MCP spec says not to base decisions on them). Every other tool is a write.
A write is destructive unless a trusted server says `destructiveHint: false` (the spec's
default for a missing hint is true). Per-tool overrides in the configuration win over all of it.
Arguments are validated against the server's own JSON schema before anything is shown or run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import mcp_types
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tools.context import ToolContext
from tools.errors import ArgumentError
from tools.mcp.config import ServerConfig
from tools.phrases import Sentence
from tools.registry import RESULT_LIMIT, Preview, ToolSpec

OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
DESCRIPTION_LIMIT = 1024
RUN_ON_SERVER = Sentence("mcp.RUN_ON_SERVER", "Run {tool} on the MCP server {server}")  # a card's summary
MORE_LINES = Sentence("mcp.MORE_LINES", "… {count} more line(s) (whole answer sha256 {digest})")  # a preview's last line
# Below the registry's cap, so the runner's own `result_text` never cuts our marker off again.
MCP_RESULT_LIMIT = RESULT_LIMIT - 500

CallTool = Callable[[ToolContext, str, str, dict[str, Any], bool], Awaitable[str]]
"""(ctx, server, tool, arguments, write) -> result text; provided by the manager."""


def _spelled(name: str) -> str:
    """A server's tool name as a card's summary says it: a name that is not plain ASCII is spelled out
    (`g\\u0456t_push`), so a look-alike of another tool (a Cyrillic і in `git_push`) cannot pass for it."""
    return name if name.isascii() else name.encode("ascii", "backslashreplace").decode("ascii")


def openai_name(server: str, tool: str) -> str:
    """`<server>__<tool>` when that is a valid OpenAI function name; else a deterministic safe form with a hash."""
    raw = f"{server}__{tool}"
    if OPENAI_NAME.match(raw):
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^a-zA-Z0-9_-]', '_', raw)[:55]}_{digest}"


@dataclass(frozen=True)
class Classification:
    read_only: bool
    destructive: bool


def classify(config: ServerConfig, tool: mcp_types.Tool) -> Classification:
    hints = tool.annotations
    read_only = config.trusted and hints is not None and hints.read_only_hint is True
    override = config.tools.get(tool.name)
    if override is not None and override.read_only is not None:
        read_only = override.read_only
    trusted_not_destructive = config.trusted and hints is not None and hints.destructive_hint is False
    destructive = not read_only and not trusted_not_destructive
    if override is not None and override.destructive is not None:
        destructive = override.destructive
    return Classification(read_only=read_only, destructive=destructive)


class McpArguments(BaseModel):
    """Arguments of an MCP tool: any keys, checked against the server's JSON schema."""

    model_config = ConfigDict(extra="allow")
    schema_validator: ClassVar[Validator | None] = None

    @model_validator(mode="before")
    @classmethod
    def _against_schema(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("the arguments must be a JSON object")
        if cls.schema_validator is not None:
            errors = sorted(cls.schema_validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
            if errors:
                said = [f"{'.'.join(str(p) for p in e.absolute_path) or '(arguments)'}: {e.message}" for e in errors[:5]]
                raise ValueError("; ".join(said))
        return data


def _schema(tool: mcp_types.Tool) -> tuple[dict[str, Any], Validator]:
    schema = dict(tool.input_schema)
    if schema.get("type", "object") != "object":
        raise SchemaError(f"the input schema's root is {schema.get('type')!r}, not an object")
    validator_class = validator_for(schema)
    validator_class.check_schema(schema)
    sent = {k: v for k, v in schema.items() if k != "$schema"}
    sent.setdefault("type", "object")
    sent.setdefault("properties", {})
    return sent, validator_class(schema)


def result_of(result: mcp_types.CallToolResult) -> str:
    """The text of a tool result (text parts; other kinds named, not inlined), capped in size."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource) and isinstance(block.resource, mcp_types.TextResourceContents):
            parts.append(block.resource.text)
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{block.type} content omitted]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    text = "\n".join(parts)
    if len(text) <= MCP_RESULT_LIMIT:
        return text
    # The digest of the whole answer: a preview asked again compares all of it, not only what was kept.
    return f"{text[:MCP_RESULT_LIMIT]}\n[... truncated (whole answer sha256 {_digest(text)}): {len(text) - MCP_RESULT_LIMIT} more characters]"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


PREVIEW_LINES = 20


def preview_of(server: str, tool: mcp_types.Tool, call: CallTool) -> Preview:
    """A card preview made by calling the read-only `tool` with the arguments its schema accepts."""
    accepted = set((tool.input_schema or {}).get("properties") or {})

    async def preview(ctx: ToolContext, args: dict[str, Any]) -> list[str]:
        answer = await call(ctx, server, tool.name, {k: v for k, v in args.items() if k in accepted}, False)
        lines = answer.splitlines() or ["(empty)"]
        more = len(lines) - PREVIEW_LINES
        # The lines not shown still count: the last line carries the digest of the whole answer, so a
        # change anywhere in it (asked again before the call runs) stops the call.
        rest = [MORE_LINES(count=more, digest=_digest(answer))] if more > 0 else []
        return [f"{tool.name}:", *lines[:PREVIEW_LINES], *rest]

    return preview


def build_spec(
    server: str,
    config: ServerConfig,
    tool: mcp_types.Tool,
    call: CallTool,
    preview: Preview | None = None,
) -> ToolSpec:
    """The ToolSpec for one listed tool. Raises SchemaError when its input schema is unusable."""
    parameters, validator = _schema(tool)
    args_model: type[McpArguments] = type(
        f"{openai_name(server, tool.name)}_args", (McpArguments,), {"schema_validator": validator}
    )
    kind = classify(config, tool)
    description = (tool.description or tool.title or f"The {tool.name} tool").strip()
    description = f"[MCP server {server}] {description}"[:DESCRIPTION_LIMIT]
    tool_name = tool.name

    async def run(ctx: ToolContext, args: dict[str, Any]) -> str:
        try:
            args_model.model_validate(args)  # approved arguments are re-checked, as for built-in tools
        except ValidationError as exc:
            raise ArgumentError(f"The arguments for {tool_name} do not match its schema: {exc.errors()[0]['msg']}") from None
        return await call(ctx, server, tool_name, args, not kind.read_only)

    return ToolSpec(
        name=openai_name(server, tool.name),
        description=description,
        read_only=kind.read_only,
        destructive=kind.destructive,
        args_model=args_model,
        run=run,
        source=f"mcp:{server}",
        describe=lambda args: RUN_ON_SERVER(tool=_spelled(tool_name), server=server),
        preview=None if kind.read_only else preview,
        parameters_schema=parameters,
        nulls_are_sent=True,
    )
