"""The model client: one Chat Completions call with tools, through the official `openai` client.

Retries (429, 5xx, timeouts, connection errors) happen in exactly one layer, the openai
client's own (`max_retries`), bounded and honouring Retry-After; every call has a timeout.
After that, `ModelUnavailable` is raised and the caller tells the user; no tool runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from bot.core import metrics
from bot.core.errors import ModelUnavailable
from storage.redact import Redactor

# The openai client insists on a key; local OpenAI-compatible servers (Ollama, vLLM) ignore it.
_PLACEHOLDER_KEY = "not-needed-for-this-endpoint"


@dataclass(frozen=True)
class ToolCall:
    """One tool call as the model sent it (arguments still raw JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ModelReply:
    content: str | None
    tool_calls: list[ToolCall]
    model: str
    latency_ms: int
    usage: dict[str, int] = field(default_factory=dict)

    def assistant_message(self) -> dict[str, Any]:
        """The reply as it is stored in the conversation and sent back on the next call."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls
            ]
        return message


class ModelClient:
    """A thin async wrapper that returns a `ModelReply` or raises `ModelUnavailable`."""

    def __init__(
        self, *, model: str, api_key: str | None, base_url: str | None, timeout: float, retries: int, redactor: Redactor
    ) -> None:
        self.model = model
        self._redactor = redactor
        self._client = AsyncOpenAI(api_key=api_key or _PLACEHOLDER_KEY, base_url=base_url, timeout=timeout, max_retries=retries)

    async def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> ModelReply:
        started = time.perf_counter()
        safe_messages = self._redactor.redact(messages)
        body: dict[str, Any] = {"model": self.model, "messages": safe_messages}
        if tools:
            body["tools"] = tools
        try:
            response = await self._post(body)
        finally:
            metrics.MODEL_SECONDS.observe(time.perf_counter() - started)
        latency_ms = int((time.perf_counter() - started) * 1000)
        if response.usage is not None:
            metrics.MODEL_TOKENS.labels("prompt").inc(response.usage.prompt_tokens or 0)
            metrics.MODEL_TOKENS.labels("completion").inc(response.usage.completion_tokens or 0)
        return self._reply(response, latency_ms)

    async def _post(self, body: dict[str, Any]) -> ChatCompletion:
        """One call, through the client's retries; every failure becomes `ModelUnavailable`."""
        try:
            # The client's low-level `post` (same retries, timeouts and errors as `chat.completions.create`)
            # skips the per-call TypedDict transform of `messages` and `tools`, which costs several
            # milliseconds per call with a dozen tool schemas (measured in benchmarks/).
            return await self._client.post("/chat/completions", body=body, cast_to=ChatCompletion)
        except openai.APIStatusError as exc:
            raise ModelUnavailable(f"model endpoint answered HTTP {exc.status_code}") from None
        except openai.APITimeoutError:
            raise ModelUnavailable("model endpoint timed out") from None
        except openai.APIConnectionError:
            raise ModelUnavailable("model endpoint unreachable") from None
        except openai.OpenAIError as exc:
            raise ModelUnavailable(f"model client error: {type(exc).__name__}") from None

    def _reply(self, response: ChatCompletion, latency_ms: int) -> ModelReply:
        if not response.choices:
            raise ModelUnavailable("model reply had no choices")
        message = response.choices[0].message
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "")
            for c in (message.tool_calls or [])
            if getattr(c, "function", None) is not None
        ]
        usage = {}
        if response.usage is not None:
            usage = {
                "prompt_tokens": response.usage.prompt_tokens,
                "completion_tokens": response.usage.completion_tokens,
                "total_tokens": response.usage.total_tokens,
            }
        if message.content is None and not calls:
            raise ModelUnavailable("model reply had neither text nor tool calls")
        return ModelReply(message.content, calls, response.model or self.model, latency_ms, usage)

    async def close(self) -> None:
        await self._client.close()
