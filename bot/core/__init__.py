"""The channel-agnostic engine: messages in, model turns, tool calls, approvals, executions,
cards and replies out, recovery. It knows no platform: adapters translate payloads into
`events` types and render `channels.CardView`.

Modules:
- `engine`      `Core`, the two entry points the adapters call (a message, a click);
- `intake`      recording inbound messages before the ack (group commit, `group_commit`); `refusals`
  audit rows for malformed signed requests;
- `runner`      the run lifecycle (start, advance, resume, finish); `turn` one model turn without SQL;
  `run_store` all SQL of a run, `run_rows` its statements on the run, conversation and inbox rows;
  `leases` who works on a run; `progress_lines` working lines held until a run has worked a while;
  `run_slots` how many new runs a process drives at once;
- `approvals`   the approval service (the state machine); `executor` runs an approved call;
  `limits` per-user limits;
- `outbox`      cards, replies and notices through the channels (delivered ones marked sent by group commit);
  `card_copies` the re-posted copies of a card (`pending`), patched with it;
- `cards`       the platform-neutral card built from a stored approval; `display` what makes its values
  honest to read; `edit_form` edit before approve;
- `sweeper`     periodic recovery on every replica, and a worker process's pick-up of new work on a wake-up;
- `policy`, `policy_file`, `memberships`  who may use, approve and what;
- `model`       the OpenAI-compatible client; `context` the explicit dependency bundle; `metrics` every
  metric; `logcontext` the ids log lines carry;
- `events`, `channels`  the small types shared with the adapters; `texts` every user-facing
  sentence, `i18n` its two languages (gettext catalogues in `locales/`, the current language),
  `language` which language a person gets; `errors` the operator-facing exception root;
- `commands`  the in-chat commands (help, pending, cancel); `channel_setup` per-channel prompt,
  model, tools and language; `home` a person's pending approvals and recent runs (Slack App Home), `home_audience`
  whose home a change concerns.

Import rules (enforced by `tests/test_layout.py`): `bot.core` imports only `bot.core.*`,
`bot.config`, `storage`, `tools`, the standard library and non-platform libraries. It never
imports an adapter (`bot.slack`, `bot.feishu`, `bot.terminal`), the app assembly or CLI
(`bot.app`, `bot.cli`, `bot.cli_audit`, `bot.cli_workers`, `bot.lifecycle`, `bot.logsetup`), nor a platform SDK (`slack_sdk`,
`slack_bolt`, `lark_oapi`).
"""
