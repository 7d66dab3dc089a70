"""The MCP configuration file (CHATOPS_MCP_CONFIG): the common `mcpServers` JSON format plus our keys.

```json
{"mcpServers": {
  "git": {"command": "uvx", "args": ["mcp-server-git", "--repository", "/srv/repo"], "env": {"TOKEN": "${GIT_TOKEN}"},
          "trusted": true, "allow": ["git_*"], "deny": ["git_reset"], "tools": {"git_log": {"read_only": true}}},
  "docs": {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer ${DOCS_TOKEN}"}}
}}
```

A stdio server has `command` (+ `args`, `env`, `cwd`); a remote one has `url` (streamable HTTP,
+ `headers`). Ours: `trusted` (default false: the server's readOnlyHint/destructiveHint are
believed only when true), `allow`/`deny` (tool names or shell-style globs; deny wins), `tools`
(per-tool `read_only`/`destructive` overrides, which win over every hint), `disabled`.
`${NAME}` in env, headers, args and url is replaced by the bot's environment variable NAME, so
secrets stay out of the file. Unknown keys are errors: a misspelt `deny` must not pass silently.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from tools.errors import ToolConfigError

VARIABLE = "CHATOPS_MCP_CONFIG"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ToolOverride(BaseModel):
    """The operator's word on one tool; wins over the server's annotations."""

    model_config = ConfigDict(extra="forbid")

    read_only: bool | None = None
    destructive: bool | None = None
    preview: str | None = Field(None, min_length=1)
    """A read-only tool of the same server whose answer, called with the arguments it accepts, shows on
    the card what this call will do; it is asked again just before the call runs, which does not run
    when the answer changed (e.g. `git_commit` previewed by `git_diff_staged`)."""


class ServerConfig(BaseModel):
    """One entry of `mcpServers`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    command: str | None = Field(None, min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    type: Literal["stdio", "http", "streamable-http", "streamableHttp"] | None = None
    trusted: bool = False
    allow: list[str] | None = None
    deny: list[str] = Field(default_factory=list)
    tools: dict[str, ToolOverride] = Field(default_factory=dict)
    disabled: bool = False

    @model_validator(mode="after")
    def _one_transport(self) -> ServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either `command` (a stdio server) or `url` (a streamable HTTP server)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("`url` must start with http:// or https://")
        if (self.type == "stdio" and self.command is None) or (self.type not in (None, "stdio") and self.url is None):
            raise ValueError(f"`type` is {self.type!r} but the entry has {'url' if self.url else 'command'}")
        return self

    def offers(self, tool: str) -> bool:
        """Whether `tool` passes this server's allow and deny lists."""
        if any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.deny):
            return False
        return self.allow is None or any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.allow)


class McpConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    servers: dict[str, ServerConfig] = Field(alias="mcpServers")

    @model_validator(mode="after")
    def _names(self) -> McpConfig:
        for name in self.servers:
            if not name.strip() or len(name) > 64:
                raise ValueError(f"server name {name!r} must be 1 to 64 characters")
        return self


def _expand(value: Any, where: str) -> Any:
    """Replace `${NAME}` references in strings (recursively) with environment variables."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            if match.group(1) not in os.environ:
                raise ToolConfigError(VARIABLE, f"{where} uses ${{{match.group(1)}}}, which is not set in the environment")
            return os.environ[match.group(1)]

        return _REFERENCE.sub(lookup, value)
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    return value


def _describe(error: ErrorDetails) -> str:
    loc = [str(part) for part in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    if len(loc) >= 2 and loc[0] == "mcpServers":
        key = ".".join(loc[2:])
        return f"server {loc[1]!r}: {f'key {key!r}: ' if key else ''}{message}"
    return f"{'.'.join(loc) or 'the file'}: {message}"


def parse_config(data: Any, *, source: str = "the MCP configuration") -> McpConfig:
    """Validate already-loaded JSON. Raises ToolConfigError naming the server and key at fault."""
    try:
        config = McpConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_url=False)[:3])
        raise ToolConfigError(VARIABLE, f"({source}) is invalid: {problems}") from None
    for name, server in config.servers.items():
        for key in ("command", "args", "env", "cwd", "url", "headers"):
            setattr(server, key, _expand(getattr(server, key), f"({source}) server {name!r}: key {key!r}"))
    return config


# A name that says its value is a credential (an env variable, a header, a URL's query parameter).
_SECRET_NAME = re.compile(r"(?i)token|key|secret|pass|auth|credential|cookie|session|signature|sig$")


def secret_values(path: Path) -> list[str]:
    """What the redactor must mask for the MCP configuration at `path`: the credentials of every `url`,
    and each value whose name says it is one: a `${NAME}` it uses, an `env` or `headers` entry (and a
    header's token after its scheme), a URL's query parameter. Other values (`LOG_LEVEL=production`, a
    path) are not masked: they would be cut out of every conversation and log line. Best effort: an
    unreadable file yields nothing (start-up reports it)."""
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw)
    except (OSError, ValueError):
        return []
    values = [os.environ.get(name, "") for name in _REFERENCE.findall(raw) if _SECRET_NAME.search(name)]
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    for server in servers.values() if isinstance(servers, dict) else ():
        if isinstance(server, dict):
            values += _server_secrets(server)
    return [v for v in values if v]


def _server_secrets(server: dict[str, Any]) -> list[str]:
    values: list[str] = []
    for key in ("env", "headers"):
        entries = server.get(key)
        for name, value in entries.items() if isinstance(entries, dict) else ():
            if isinstance(value, str) and _SECRET_NAME.search(str(name)):
                value = _expand_known(value)
                values += [value, value.partition(" ")[2]]
    if isinstance(server.get("url"), str):
        url = urlsplit(_expand_known(server["url"]))
        values += [url.password or "", *(v for k, v in parse_qsl(url.query) if _SECRET_NAME.search(k))]
    return values


def _expand_known(value: str) -> str:
    return _REFERENCE.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)


def shown_url(url: str) -> str:
    """A server URL as it may appear in a message: no credentials, no query, no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def load_config(path: Path) -> McpConfig:
    """Read and validate the file at `path`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ToolConfigError(VARIABLE, f"cannot be read ({path}: {exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ToolConfigError(
            VARIABLE, f"({path}) is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    return parse_config(data, source=str(path))
