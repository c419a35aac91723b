"""One logical Messages API request, streamed, with bounded retries.

Two layers: the SDK retries what fails before a response starts (408/409/429/5xx/529,
connection errors; honouring retry-after), and `stream_message` retries the whole request
when a fault arrives after HTTP 200 (an `overloaded_error` SSE event, a dropped stream), so
a partial answer is always discarded. A 429 without retry-after is a spend limit: it is
never retried and becomes `AgentPaused`. The SDK is imported lazily: it costs seconds."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.agents.base import AgentPaused
from engine.apikey import redact
from engine.config import AnthropicSettings

RETRY_AFTER_CAP_S = 300.0  # a longer retry-after is still honoured by pausing instead
STREAM_BACKOFF_MAX_S = 60.0
RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
ERROR_TEXT_LIMIT = 500
# What a request may send back of an assistant block; the rest is response-only metadata.
_BLOCK_FIELDS = {
    "text": ("type", "text"),
    "tool_use": ("type", "id", "name", "input"),
    "thinking": ("type", "thinking", "signature"),
    "redacted_thinking": ("type", "data"),
}


class AgentUnreachable(AgentPaused):
    """The API stayed unavailable (overloaded, failing, unreachable) through every retry."""


class SpendLimitReached(Exception):
    """A 429 without retry-after: the account's spend limit, which waiting will not lift."""


@dataclass(frozen=True)
class StreamFault:
    """One failed try, for the journal (the text is already redacted)."""

    kind: str
    message: str
    status: int | None = None


@dataclass(frozen=True)
class Streamed:
    """A complete response: the message as the API returns it (non-streaming form)."""

    message: dict[str, Any]
    request_id: str | None


def make_client(settings: AnthropicSettings, api_key: str) -> Any:
    """An `AsyncAnthropic` client with the configured endpoint, timeout, retries and backoff."""
    import anthropic

    class SpendLimitGuard(anthropic.Middleware):
        """Stops a spend-limit 429 before the SDK's retry loop sees it."""

        async def handle_async(self, request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            http = response.http_response
            headers = http.headers
            if http.status_code == 429 and not (
                headers.get("retry-after") or headers.get("retry-after-ms")
            ):
                await http.aread()
                raise SpendLimitReached(_api_message(http.text).rstrip(".")) from None
            return response

    class Client(anthropic.AsyncAnthropic):
        # The SDK's backoff (0.5 s doubling to 8 s) is fixed: ours is configurable, so tests
        # stay fast and long runs can wait longer. A server's retry-after always wins.
        def _calculate_retry_timeout(
            self, remaining_retries: int, options: Any, response_headers: Any = None
        ) -> float:
            retry_after = self._parse_retry_after_header(response_headers)
            if retry_after is not None and retry_after > 0:
                return min(retry_after, RETRY_AFTER_CAP_S)
            done = max(settings.max_retries - remaining_retries, 0)
            delay = min(settings.retry_backoff_s * 2.0**done, settings.retry_backoff_max_s)
            return delay * (1 - 0.25 * random.random())

    return Client(
        api_key=api_key,
        base_url=settings.base_url,
        timeout=settings.request_timeout_s,
        max_retries=settings.max_retries,
        middleware=[SpendLimitGuard()],
    )


def _api_message(body: str) -> str:
    """The `error.message` of an API error body, else the body itself (shortened)."""
    import json

    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body
    return str(message)[:ERROR_TEXT_LIMIT]


def message_to_dict(message: Any) -> dict[str, Any]:
    """A streamed message as plain JSON (the non-streaming response's shape)."""
    data = message.model_dump(mode="json", exclude_none=True)
    for block in data.get("content", []):
        block.pop("parsed_output", None)
    return data


def assistant_content(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The message's content as request blocks: what the API accepts back, unchanged
    (thinking blocks keep their signatures)."""
    blocks = []
    for block in message.get("content", []):
        if block.get("type") == "text" and not block.get("text"):
            continue  # the API refuses empty text blocks
        fields = _BLOCK_FIELDS.get(block.get("type", ""))
        blocks.append({k: block[k] for k in fields if k in block} if fields else dict(block))
    return blocks


def _backoff(attempt: int, base_s: float) -> float:
    return min(base_s * 2.0**attempt, STREAM_BACKOFF_MAX_S) * (0.5 + random.random() / 2)


async def stream_message(
    client: Any,
    request: dict[str, Any],
    *,
    retries: int,
    secret: str | None,
    on_fault: Callable[[StreamFault], None] = lambda fault: None,
    backoff_s: float = 2.0,
) -> Streamed:
    """Send one request (streaming) and return the complete message; retries the whole
    request after a mid-stream fault, up to `retries` times with jittered backoff.

    Raises AgentPaused for what a human must fix (spend limit, refused key or request) and
    AgentUnreachable when the API stays unavailable."""
    import anthropic
    import httpx2

    last = ""
    for attempt in range(retries + 1):
        try:
            async with client.messages.stream(**request) as stream:
                message = await stream.get_final_message()
                request_id = stream.request_id
            if message.stop_reason is None:
                raise _Incomplete("the stream ended before the message was complete")
            return Streamed(message_to_dict(message), request_id)
        except SpendLimitReached as exc:
            raise AgentPaused(
                "the Anthropic API refused the request with a spend limit (429 without "
                f"retry-after): {redact(str(exc), secret)}. Raise the limit, then resume."
            ) from None
        except anthropic.APIStatusError as exc:
            fault = _status_fault(exc, secret)
            if exc.status_code != 200 or exc.type not in RETRYABLE_STREAM_ERRORS:
                raise _paused_for(exc, fault) from None
        except anthropic.APIConnectionError as exc:
            # the SDK already retried it: the endpoint is unreachable
            raise AgentUnreachable(
                f"cannot reach the Anthropic API ({redact(str(exc), secret)}); "
                "resume when it is reachable"
            ) from None
        except (httpx2.TransportError, _Incomplete, ValueError) as exc:
            # a dropped or garbled stream after HTTP 200: retry the whole request
            fault = StreamFault("stream", redact(f"{type(exc).__name__}: {exc}", secret))
        on_fault(fault)
        last = fault.message
        if attempt < retries:
            await asyncio.sleep(_backoff(attempt, backoff_s))
    raise AgentUnreachable(
        f"the Anthropic API failed mid-stream {retries + 1} times (last: {last}); "
        "resume when it is back"
    )


class _Incomplete(Exception):
    """A stream that ended without its message_stop."""


def _status_fault(exc: Any, secret: str | None) -> StreamFault:
    message = exc.api_message or (str(exc) if exc.body is None else str(exc.body))
    return StreamFault(str(exc.type or "status"), redact(message[:ERROR_TEXT_LIMIT], secret),
                       exc.status_code)


def _paused_for(exc: Any, fault: StreamFault) -> AgentPaused:
    """What a status error means for the run, worded for the person who must act."""
    status = exc.status_code
    if status in (401, 403):
        return AgentPaused(f"the Anthropic API refused the key ({status}: {fault.message}); "
                           "fix ANTHROPIC_API_KEY or the key file, then resume")
    if status == 429 or status >= 500:
        return AgentUnreachable(f"the Anthropic API stayed unavailable after retries ({status} "
                                f"{fault.kind}: {fault.message}); resume when it is back")
    return AgentPaused(f"the Anthropic API refused the request ({status} {fault.kind}: "
                       f"{fault.message}); check exploration.anthropic, then resume")
