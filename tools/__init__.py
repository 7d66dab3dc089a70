"""The tools the agent can call: typed functions whose JSON schema comes from the signature
(`registry`), grouped in toolsets (built-in CRM, e-mail, notifications, MCP servers). What a tool
shows people on a card (its summary, its preview lines) is declared as `phrases.Sentence`s in English;
the app translates them.

Import rules (enforced by `tests/test_layout.py`): `tools` imports only `tools.*`, `storage`,
the standard library and third-party libraries. It never imports `bot` (neither the core nor an
adapter): each toolset receives its own typed config and services through `tools.context.ToolContext`,
and raises `tools.errors` exceptions that the app maps to operator errors.
"""
