"""Errors the operator sees. Everything raised for an operator derives from `ChatopsError`.

Errors the *model* sees (bad arguments, a failed tool) are not here: they live in
`tools/errors.py` and are fed back to the model as tool results.
"""

from __future__ import annotations


class ChatopsError(Exception):
    """Root of every operator-facing error; its message is safe to print (no secrets, no trace)."""


class ConfigError(ChatopsError):
    """A configuration variable is missing or wrong."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable} {problem}")


class PolicyError(ChatopsError):
    """The policy file is malformed."""


class ModelUnavailable(ChatopsError):
    """The model endpoint failed after its bounded retries (or answered something unusable)."""


class ModelReplyUnusable(ModelUnavailable):
    """The model endpoint answered, each time, with what is not a usable completion (not JSON, no
    choices, a tool call whose arguments are not a JSON object, text that is not valid Unicode...)."""


class StorageError(ChatopsError):
    """The database could not be reached or migrated."""


class StorageUnavailable(StorageError):
    """The database did not answer (refused, unreachable, timed out): it may come back without anyone
    changing the configuration, so `chatops` exits with `EXIT_UNAVAILABLE` and systemd starts it again."""


EXIT_CONFIG = 2  # the operator must change something: systemd does not restart (RestartPreventExitStatus=2)
EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL (sysexits.h): the database did not answer; starting again may work
