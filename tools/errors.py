"""Errors the *model* sees. A tool raises these; the agent turns them into the tool result.

They are never shown with a stack trace and never reach the operator's exception root
(`bot.core.errors.ChatopsError`), which is for configuration and infrastructure problems.
"""

from __future__ import annotations


class ToolError(Exception):
    """The call failed and the model should adapt. The message is what the model reads."""

    kind = "tool_error"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class ArgumentError(ToolError):
    """The arguments are unusable (caught before any approval card is shown)."""

    kind = "invalid_arguments"


class ToolUnavailable(ToolError):
    """The tool's backend (an MCP server, SMTP, an API) cannot be reached right now."""

    kind = "tool_unavailable"


class ToolInDoubt(ToolError):
    """The effect may or may not have happened (e.g. the SMTP connection dropped after DATA).

    The approval ends `in_doubt`; it is never retried automatically.
    """

    kind = "in_doubt"


class ToolConfigError(Exception):
    """A toolset's configuration is missing or wrong (raised at start-up, never to the model).

    The app maps it to the operator's `ConfigError`, naming the same variable.
    """

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable} {problem}")
