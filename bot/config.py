"""Configuration: every variable the bot reads, validated once at start-up.

Values come from the environment and from a `.env` file (python-dotenv); a real environment
variable always wins. A bad value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bot.core.errors import ConfigError
from storage.audit_keys import default_key_file

ANCHOR_FILE_NAME = "chatops-audit.anchors"


def url_credentials(url: str | None) -> list[str]:
    """The password (and the whole `user:pass` part) of a URL's `user:pass@`, if any."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    if not password:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    return [password, userinfo]


class Settings(BaseModel):
    """All settings. Field aliases are the environment variable names."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    # The model
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    model: str | None = Field(None, alias="CHATOPS_MODEL")
    model_timeout: float = Field(60.0, alias="CHATOPS_MODEL_TIMEOUT", gt=0)
    model_retries: int = Field(2, alias="CHATOPS_MODEL_RETRIES", ge=0, le=10)
    system_prompt: str | None = Field(None, alias="CHATOPS_SYSTEM_PROMPT")

    # Core
    database_url: str = Field("sqlite:///chatops.db", alias="DATABASE_URL")
    host: str = Field("127.0.0.1", alias="CHATOPS_HOST")
    port: int = Field(3000, alias="CHATOPS_PORT", ge=0, le=65535)
    policy_file: Path | None = Field(None, alias="CHATOPS_POLICY")
    mcp_config: Path | None = Field(None, alias="CHATOPS_MCP_CONFIG")
    approval_ttl: float = Field(24 * 3600.0, alias="CHATOPS_APPROVAL_TTL", gt=0)
    max_steps: int = Field(8, alias="CHATOPS_MAX_STEPS", ge=1, le=100)
    history_limit: int = Field(60, alias="CHATOPS_HISTORY_LIMIT", ge=4)
    tool_timeout: float = Field(60.0, alias="CHATOPS_TOOL_TIMEOUT", gt=0)
    sweep_interval: float = Field(5.0, alias="CHATOPS_SWEEP_INTERVAL", gt=0)
    lease_seconds: float = Field(30.0, alias="CHATOPS_LEASE_SECONDS", ge=1)
    db_pool_size: int = Field(10, alias="CHATOPS_DB_POOL_SIZE", ge=2, le=500)
    db_stall_seconds: float = Field(30.0, alias="CHATOPS_DB_STALL_SECONDS", ge=1, le=3600)
    workers: int | None = Field(None, alias="CHATOPS_WORKERS", ge=0, le=256)
    outbox_deadline: float = Field(600.0, alias="CHATOPS_OUTBOX_DEADLINE", gt=0)
    model_notice_after: float = Field(15.0, alias="CHATOPS_MODEL_NOTICE_AFTER", gt=0)
    progress_after: float = Field(1.0, alias="CHATOPS_PROGRESS_AFTER", ge=0)
    retention_days: int = Field(30, alias="CHATOPS_RETENTION_DAYS", ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="CHATOPS_LOG_LEVEL")
    audit_token: SecretStr | None = Field(None, alias="CHATOPS_AUDIT_TOKEN")

    # The audit chain's key and anchors (kept outside the database)
    audit_key: SecretStr | None = Field(None, alias="CHATOPS_AUDIT_KEY")
    audit_key_file: Path | None = Field(None, alias="CHATOPS_AUDIT_KEY_FILE")
    audit_anchor_file: Path | None = Field(None, alias="CHATOPS_AUDIT_ANCHOR_FILE")
    audit_anchor_interval: float = Field(300.0, alias="CHATOPS_AUDIT_ANCHOR_INTERVAL", gt=0)
    log_format: Literal["text", "json"] = Field("text", alias="CHATOPS_LOG_FORMAT")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field("auto", alias="CHATOPS_EVENT_LOOP")
    # prometheus-client's own variable: `chatops serve` puts it in every process's environment
    metrics_dir: str | None = Field(None, alias="PROMETHEUS_MULTIPROC_DIR")

    # Slack
    slack_bot_token: SecretStr | None = Field(None, alias="SLACK_BOT_TOKEN")
    slack_signing_secret: SecretStr | None = Field(None, alias="SLACK_SIGNING_SECRET")
    slack_app_token: SecretStr | None = Field(None, alias="SLACK_APP_TOKEN")
    slack_api_url: str = Field("https://slack.com/api/", alias="SLACK_API_URL")

    # Feishu / Lark
    feishu_app_id: str | None = Field(None, alias="FEISHU_APP_ID")
    feishu_app_secret: SecretStr | None = Field(None, alias="FEISHU_APP_SECRET")
    feishu_verification_token: SecretStr | None = Field(None, alias="FEISHU_VERIFICATION_TOKEN")
    feishu_encrypt_key: SecretStr | None = Field(None, alias="FEISHU_ENCRYPT_KEY")
    feishu_domain: str = Field("https://open.feishu.cn", alias="FEISHU_DOMAIN")
    feishu_mode: Literal["ws", "webhook"] = Field("ws", alias="FEISHU_MODE")
    feishu_webhook_url: str | None = Field(None, alias="FEISHU_WEBHOOK_URL")
    feishu_webhook_secret: SecretStr | None = Field(None, alias="FEISHU_WEBHOOK_SECRET")

    # E-mail
    smtp_host: str | None = Field(None, alias="SMTP_HOST")
    smtp_port: int | None = Field(None, alias="SMTP_PORT", ge=1, le=65535)
    smtp_username: str | None = Field(None, alias="SMTP_USERNAME")
    smtp_password: SecretStr | None = Field(None, alias="SMTP_PASSWORD")
    smtp_from: str | None = Field(None, alias="SMTP_FROM")
    smtp_security: Literal["starttls", "ssl", "none"] = Field("starttls", alias="SMTP_SECURITY")
    smtp_timeout: float = Field(30.0, alias="SMTP_TIMEOUT", gt=0)
    email_allowed_domains: str | None = Field(None, alias="CHATOPS_EMAIL_ALLOWED_DOMAINS")

    # CRM
    crm_backend: Literal["builtin", "hubspot"] = Field("builtin", alias="CHATOPS_CRM")
    hubspot_token: SecretStr | None = Field(None, alias="HUBSPOT_TOKEN")
    hubspot_base_url: str = Field("https://api.hubapi.com", alias="HUBSPOT_BASE_URL")

    @field_validator("openai_base_url", "slack_api_url", "feishu_domain", "hubspot_base_url", "feishu_webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("database_url")
    @classmethod
    def _sqlite_or_postgres(cls, value: str) -> str:
        if value.startswith("postgres://"):  # libpq's (and many hosts') spelling; SQLAlchemy knows only postgresql://
            value = "postgresql://" + value.removeprefix("postgres://")
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError("is not a database URL (sqlite:///chatops.db or postgresql://user:pass@host:5432/db)") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"must be SQLite (sqlite:///…) or PostgreSQL (postgresql://…), not {backend}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value  # `debug` as well as `DEBUG`

    # ---- derived facts -------------------------------------------------
    @property
    def model_configured(self) -> bool:
        return bool(self.model and (self.openai_api_key or self.openai_base_url))

    @property
    def slack_enabled(self) -> bool:
        return self.slack_bot_token is not None

    @property
    def feishu_enabled(self) -> bool:
        return bool(self.feishu_app_id and self.feishu_app_secret)

    @property
    def allowed_email_domains(self) -> frozenset[str]:
        raw = self.email_allowed_domains or ""
        return frozenset(d.strip().lower().lstrip("@") for d in raw.split(",") if d.strip())

    def secret_values(self) -> list[str]:
        """Every configured secret, for the redactor: secret-typed values and credentials inside URLs."""
        values = [v.get_secret_value() for v in self.__dict__.values() if isinstance(v, SecretStr)]
        values += url_credentials(self.database_url)
        for url in (self.openai_base_url, self.slack_api_url, self.feishu_domain, self.hubspot_base_url):
            values += url_credentials(url)
        if self.feishu_webhook_url:  # the custom-bot webhook's token is its last path segment
            token = urlsplit(self.feishu_webhook_url).path.rstrip("/").rpartition("/")[2]
            values += [self.feishu_webhook_url, token, *url_credentials(self.feishu_webhook_url)]
        values += self._audit_key_file_values()
        if self.mcp_config is not None:  # the MCP servers' tokens (env, headers, URL keys)
            from tools.mcp.config import secret_values as mcp_secret_values

            values += mcp_secret_values(self.mcp_config)
        values += [unquote(v) for v in values]
        return sorted({v for v in values if v})

    def _audit_key_file_values(self) -> list[str]:
        """The keys in the audit key file, when it exists (the log redactor is built before the app reads it)."""
        if self.audit_key is not None:
            return []
        try:
            return self.audit_key_path.read_text(encoding="ascii").split()
        except (OSError, UnicodeDecodeError, ValueError):
            return []

    @property
    def audit_key_path(self) -> Path:
        """The audit key file: CHATOPS_AUDIT_KEY_FILE, else next to the SQLite file (or in the working dir)."""
        return self.audit_key_file or default_key_file(self.database_url)

    @property
    def audit_anchor_path(self) -> Path:
        """Where the running bot appends the chain head: CHATOPS_AUDIT_ANCHOR_FILE, else beside the key file."""
        return self.audit_anchor_file or self.audit_key_path.with_name(ANCHOR_FILE_NAME)

    def check_channels(self) -> None:
        """Fail fast when a channel is half-configured (a missing secret would fail open)."""
        if self.slack_enabled and self.slack_app_token is None and self.slack_signing_secret is None:
            raise ConfigError("SLACK_SIGNING_SECRET", "is required for HTTP mode (or set SLACK_APP_TOKEN for Socket Mode)")
        if self.slack_app_token is not None and self.slack_bot_token is None:
            raise ConfigError("SLACK_BOT_TOKEN", "is required when SLACK_APP_TOKEN is set")
        if bool(self.feishu_app_id) != bool(self.feishu_app_secret):
            missing = "FEISHU_APP_SECRET" if self.feishu_app_id else "FEISHU_APP_ID"
            raise ConfigError(missing, "is required when the other Feishu credential is set")
        if (
            self.feishu_enabled
            and self.feishu_mode == "webhook"
            and not (self.feishu_verification_token or self.feishu_encrypt_key)
        ):
            raise ConfigError(
                "FEISHU_VERIFICATION_TOKEN", "or FEISHU_ENCRYPT_KEY is required in webhook mode (FEISHU_MODE=webhook)"
            )
        if self.crm_backend == "hubspot" and self.hubspot_token is None:
            raise ConfigError("HUBSPOT_TOKEN", "is required when CHATOPS_CRM=hubspot")


def no_model_message(settings: Settings) -> str:
    """Which model variables are actually missing (for the operator)."""
    missing = []
    if not settings.model:
        missing.append("CHATOPS_MODEL is not set (e.g. gpt-4o-mini)")
    if not (settings.openai_api_key or settings.openai_base_url):
        missing.append("neither OPENAI_API_KEY nor OPENAI_BASE_URL (a local OpenAI-compatible server: Ollama, vLLM...) is set")
    return "no language model is configured: " + " and ".join(missing) + ". See .env.example."


_FIELD_BY_ALIAS = {f.alias: name for name, f in Settings.model_fields.items()}


_ALIASES = [alias for alias in _FIELD_BY_ALIAS if alias]
_CLOSE_ENOUGH = 0.85  # difflib's ratio above which an unknown name is taken for a typo of a setting


def unknown_variables(env_file: Path | None = Path(".env"), environ: dict[str, str] | None = None) -> list[str]:
    """What a typo would otherwise hide: each name in the `.env` file that is no setting, and each
    CHATOPS_ name in the environment that looks like a misspelt one (other CHATOPS_ names there may
    be another program's), one sentence each, naming the setting it most likely meant."""
    found: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        found |= {name: str(env_file) for name in dotenv_values(env_file)}
    source = os.environ if environ is None else environ
    for name in source:
        if name.startswith("CHATOPS_") and difflib.get_close_matches(name, _ALIASES, 1, _CLOSE_ENOUGH):
            found.setdefault(name, "the environment")
    problems = []
    for name, where in sorted(found.items()):
        if name in _FIELD_BY_ALIAS:
            continue
        guess = difflib.get_close_matches(name, _ALIASES, 1, 0.6)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        problems.append(f"{name} (in {where}) is not a setting and is ignored{hint}")
    return problems


def load_settings(env_file: Path | None = Path(".env"), environ: dict[str, str] | None = None) -> Settings:
    """Read `.env` (if any), overlay the real environment, validate. Raises ConfigError."""
    values: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    source = os.environ if environ is None else environ
    values.update({k: v for k, v in source.items() if k in _FIELD_BY_ALIAS})
    values = {k: v for k, v in values.items() if k in _FIELD_BY_ALIAS and v != ""}
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "configuration"
        alias = Settings.model_fields[field].alias if field in Settings.model_fields else field
        got = values.get(alias or field, "")
        for credential in url_credentials(got):  # a URL's password stays off the terminal and the journal
            got = got.replace(credential, "***")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(alias or field, f"{message[:1].lower()}{message[1:]} (got {got!r})") from None
    settings.check_channels()
    return settings
