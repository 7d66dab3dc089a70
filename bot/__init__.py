"""chatops-agent: the bot. `bot.core` is the channel-agnostic engine; around it, this package
holds the channel adapters (`slack`, `feishu`, `terminal`), the app assembly (`app`, `config`,
`toolsetup`, `logsetup`), the command line (`cli`, `cli_audit`), the process model of `chatops serve`
(`cli_workers` the front and worker processes, `lifecycle` what every such process shares: signals,
start-up unless stopped, its channels; `supervisor` their supervision, `wake` the wake-ups from front
to workers, `sdnotify` systemd's readiness and watchdog) and the read-only audit page (`auditweb`).

Import rules (enforced by `tests/test_layout.py`): adapters import `bot.core`, `bot.config`,
their own SDK and their own package (and `tools.services`/`tools.config` for a service they
implement for the tools), never another adapter; `bot.app` and the CLI may import
everything. Nothing in `bot` is imported by `tools` or `storage`.
"""
