"""The model client: one Chat Completions call with tools, through the official `openai` client.

Retries happen in exactly one layer, here (tenacity; the openai client's own retries are off): on
429, 5xx, timeouts, connection errors and on answers that break the API's promises (a body that
is not a completion, no `choices`, neither text nor tool calls, tool calls without an id or name or
with arguments that are not a JSON object). Each attempt has the one timeout (CHATOPS_MODEL_TIMEOUT);
there are at most CHATOPS_MODEL_RETRIES + 1 attempts, waiting the endpoint's Retry-After or an
exponential backoff between them. Then `ModelUnavailable` is raised and the caller tells the user;
no tool runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
from openai import AsyncOpenAI
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from bot.core import metrics
from bot.core.errors import ModelReplyUnusable, ModelUnavailable
from storage.redact import Redactor
from storage.retrying import first_then_retry

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


class MalformedReply(Exception):
    """The endpoint answered 200 with something that is not a usable completion."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, openai.APITimeoutError | openai.APIConnectionError | MalformedReply)


_backoff = wait_exponential_jitter(multiplier=0.5, max=8)
RETRY_AFTER_CAP = 30.0


def _wait(state: RetryCallState) -> float:
    """The endpoint's Retry-After when it sent one (429/503), else exponential backoff with jitter."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, openai.APIStatusError):
        header = exc.response.headers.get("retry-after")
        try:
            return min(RETRY_AFTER_CAP, max(0.0, float(header))) if header else _backoff(state)
        except ValueError:
            return _backoff(state)
    return _backoff(state)


def _transport_error(exc: BaseException) -> BaseException:
    """The aiohttp error under the openai client's (which wraps httpx's, which wraps aiohttp's)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"model endpoint answered HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        cause = _transport_error(exc)
        if isinstance(cause, aiohttp.ServerDisconnectedError):  # the transport maps it to a "timeout"
            return "model endpoint closed the connection"
        if isinstance(cause, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
            return "model endpoint timed out"
        return "model endpoint unreachable"
    if isinstance(exc, MalformedReply):
        return f"model reply unusable: {exc}"
    return f"model client error: {type(exc).__name__}"


class _Function(BaseModel):
    name: str | None = None
    arguments: str | None = None


class _Call(BaseModel):
    id: str | None = None
    function: _Function | None = None


class _Message(BaseModel):
    content: str | None = None
    tool_calls: list[_Call] | None = None


class _Choice(BaseModel):
    message: _Message


class _Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _Completion(BaseModel):
    """What the bot reads of a Chat Completions answer; anything else in it is ignored, as the
    openai client's own (non-validating) models do, so OpenAI-compatible servers that add or
    omit other fields keep working."""

    model: str | None = None
    choices: list[_Choice] = []
    usage: _Usage | None = None


def _completion(body: bytes) -> _Completion:
    try:
        return _Completion.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise MalformedReply("not JSON") from None
        raise MalformedReply(f"not a completion (at {'.'.join(map(str, first['loc']))})") from None


def _tool_calls(message: _Message) -> list[ToolCall]:
    calls = []
    for c in message.tool_calls or []:
        function = c.function
        if function is None:
            continue
        if not c.id or not function.name:
            raise MalformedReply("a tool call without an id or a name")
        arguments = function.arguments or "{}"
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise MalformedReply(f"arguments of {function.name} are not a JSON object")
        calls.append(ToolCall(id=c.id, name=function.name, arguments=arguments))
    return calls


class ModelClient:
    """A thin async wrapper that returns a `ModelReply` or raises `ModelUnavailable`."""

    def __init__(
        self, *, model: str, api_key: str | None, base_url: str | None, timeout: float, retries: int, redactor: Redactor
    ) -> None:
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self._redactor = redactor
        # The SDK's aiohttp transport (its own documented option): the same requests, errors and
        # timeouts as its default httpx transport, at ~0.3 ms less CPU a call (benchmarks/).
        http = openai.DefaultAioHttpClient(timeout=timeout)
        self._client = AsyncOpenAI(
            api_key=api_key or _PLACEHOLDER_KEY, base_url=base_url, timeout=timeout, max_retries=0, http_client=http
        )

    async def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, model: str | None = None
    ) -> ModelReply:
        """One call through the one retry layer; `model` overrides the configured model (a channel's own)."""
        body: dict[str, Any] = {"model": model or self.model, "messages": self._redactor.redact(messages)}
        if tools:
            body["tools"] = tools
        content = orjson.dumps(body)
        try:
            return await first_then_retry(lambda: self._once(content), self._policy, _retryable)
        except MalformedReply as exc:  # the last attempt answered, with something unusable
            raise ModelReplyUnusable(_describe(exc)) from None
        except Exception as exc:  # noqa: BLE001 - every failure after the one retry layer is "model unavailable"
            raise ModelUnavailable(_describe(exc)) from None

    def _policy(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.retries + 1),
            wait=_wait,
            reraise=True,
        )

    async def _once(self, content: bytes) -> ModelReply:
        started = time.perf_counter()
        try:
            return await self._attempt(content, started)
        finally:
            metrics.MODEL_SECONDS.observe(time.perf_counter() - started)

    async def _attempt(self, content: bytes, started: float) -> ModelReply:
        # The client's low-level `post` (same errors and timeout as `chat.completions.create`) with
        # the body already serialised (orjson) and the answer read as bytes: it skips the SDK's
        # per-call TypedDict transform of `messages` and `tools`, its JSON encoder and its
        # field-by-field model construction, ~0.7 ms a call with a dozen tool schemas (benchmarks/).
        # Only a 2xx answer reaches the parse: the SDK raises its status errors as before.
        try:
            answer = await self._client.post("/chat/completions", content=content, cast_to=bytes)
        except (openai.APIStatusError, openai.APITimeoutError, openai.APIConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - a 2xx the client could not read
            raise MalformedReply(type(exc).__name__) from None
        response = _completion(answer)
        if not response.choices:
            raise MalformedReply("no choices")
        message = response.choices[0].message
        calls = _tool_calls(message)
        if message.content is None and not calls:
            raise MalformedReply("neither text nor tool calls")
        usage = {}
        if response.usage is not None:
            usage = {
                "prompt_tokens": response.usage.prompt_tokens or 0,
                "completion_tokens": response.usage.completion_tokens or 0,
                "total_tokens": response.usage.total_tokens or 0,
            }
            metrics.MODEL_TOKENS.labels("prompt").inc(usage["prompt_tokens"])
            metrics.MODEL_TOKENS.labels("completion").inc(usage["completion_tokens"])
        latency_ms = int((time.perf_counter() - started) * 1000)
        return ModelReply(message.content, calls, response.model or self.model, latency_ms, usage)

    async def close(self) -> None:
        await self._client.close()
