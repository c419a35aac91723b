"""A local stand-in for the Anthropic Messages API, for tests of the real SDK client.

It listens on 127.0.0.1 (random port) and speaks the real wire format: `POST /v1/messages`
with `stream: true` answered by Server-Sent Events in chunked encoding (message_start,
content blocks with text or input_json deltas, message_delta with usage, message_stop),
error bodies `{"type": "error", "error": {...}}` with their status codes and headers, an
`event: error` after HTTP 200, and dropped connections. Replies come from a script (one
action per request, in order) or, when it is empty, from a responder function.

It records every request (headers and JSON body) and counts billed answers: streams that
reached message_stop."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from typing import Any

API_VERSION_HEADER = "anthropic-version"


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


@dataclass(frozen=True)
class Message:
    """A complete streamed answer."""

    content: tuple[dict[str, Any], ...]
    stop_reason: str = "tool_use"
    output_tokens: int | None = None
    error_after_events: int | None = None  # send an overloaded_error SSE event after N events
    drop_after_events: int | None = None  # cut the connection after N events (no final chunk)


@dataclass(frozen=True)
class Status:
    """An HTTP error answer."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Disconnect:
    """Close the connection without answering."""


Action = Message | Status | Disconnect
Responder = Callable[[dict[str, Any]], Action]


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def tool_use(name: str, arguments: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id or f"toolu_{name}", "name": name,
            "input": arguments}


def message(*content: dict[str, Any], stop_reason: str | None = None, **kwargs: Any) -> Message:
    """A streamed answer; the stop reason defaults to tool_use when a tool is called."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
    return Message(tuple(content), stop_reason, **kwargs)


def overloaded(headers: dict[str, str] | None = None) -> Status:
    return Status(529, "overloaded_error", "Overloaded", headers or {})


def rate_limited(retry_after: str | None = "0") -> Status:
    """A 429; without retry-after it reads as a spend limit."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Status(429, "rate_limit_error", "This request would exceed your rate limit", headers)


def spend_limited() -> Status:
    return Status(429, "rate_limit_error",
                  "You have reached your specified API usage limits.", {})


def tokens(value: Any) -> int:
    """A rough token count (4 characters a token) of any JSON value."""
    return max(1, len(json.dumps(value)) // 4)


class FakeAnthropic:
    """The server; use as a context manager. `url` is the base URL for the client."""

    def __init__(self, api_key: str, responder: Responder | None = None):
        self.api_key = api_key
        self.responder = responder
        self.script: list[Action] = []
        self.requests: list[Received] = []
        self.billed = 0
        self.billed_usage: list[dict[str, int]] = []
        self._seen_prefixes: set[str] = set()
        self._lock = threading.Lock()
        self._ids = count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def then(self, *actions: Action) -> FakeAnthropic:
        """Queue actions, one per coming request."""
        with self._lock:
            self.script.extend(actions)
        return self

    def _next_action(self, body: dict[str, Any]) -> Action:
        with self._lock:
            if self.script:
                return self.script.pop(0)
        if self.responder is None:
            return Status(500, "api_error", "the fake has no answer scripted")
        return self.responder(body)

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Input usage with prompt caching simulated: the system prompt (the marked prefix) is
        written to the cache the first time and read from it afterwards."""
        system = body.get("system", [])
        cached = isinstance(system, list) and any("cache_control" in b for b in system)
        prefix = tokens(system) + tokens(body.get("tools", []))
        rest = tokens(body.get("messages", []))
        if not cached:
            return {"input_tokens": prefix + rest, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0}
        digest = hashlib.sha256(json.dumps([system, body.get("tools")]).encode()).hexdigest()
        with self._lock:
            hit = digest in self._seen_prefixes
            self._seen_prefixes.add(digest)
        return {"input_tokens": rest,
                "cache_creation_input_tokens": 0 if hit else prefix,
                "cache_read_input_tokens": prefix if hit else 0}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # keep the test output clean

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                length = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                headers = {key.lower(): value for key, value in self.headers.items()}
                with fake._lock:
                    fake.requests.append(Received(self.path, headers, body, raw))
                if self.path.split("?")[0] != "/v1/messages":
                    return self._error(Status(404, "not_found_error", f"no route {self.path}"))
                if fake.api_key not in (headers.get("x-api-key"),
                                        headers.get("authorization", "").removeprefix("Bearer ")):
                    return self._error(Status(401, "authentication_error", "invalid x-api-key"))
                if API_VERSION_HEADER not in headers or not body.get("stream"):
                    return self._error(Status(400, "invalid_request_error",
                                              "expected a streaming request"))
                action = fake._next_action(body)
                if isinstance(action, Disconnect):
                    return self._drop()
                if isinstance(action, Status):
                    return self._error(action)
                self._stream(action, body)

            def _drop(self) -> None:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

            def _error(self, status: Status) -> None:
                payload = json.dumps({"type": "error", "error": {
                    "type": status.error_type, "message": status.message}}).encode()
                self.send_response(status.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.send_header("request-id", f"req_err_{next(fake._ids)}")
                for key, value in status.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _event(self, name: str, data: dict[str, Any]) -> None:
                self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

            def _stream(self, answer: Message, body: dict[str, Any]) -> None:
                usage = fake._usage(body)
                number = next(fake._ids)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.send_header("request-id", f"req_{number}")
                self.end_headers()
                events = _events(answer, body.get("model", "claude-test"), number, usage)
                for index, (name, data) in enumerate(events):
                    if answer.error_after_events is not None and index == \
                            answer.error_after_events:
                        self._event("error", {"type": "error", "error": {
                            "type": "overloaded_error", "message": "Overloaded"}})
                        self._chunk(b"")
                        return
                    if answer.drop_after_events is not None and index == \
                            answer.drop_after_events:
                        return self._drop()
                    self._event(name, data)
                self._chunk(b"")
                output = events[-2][1]["usage"]["output_tokens"]
                with fake._lock:
                    fake.billed += 1
                    fake.billed_usage.append({**usage, "output_tokens": output})

        return Handler


def _events(
    answer: Message, model: str, number: int, usage: dict[str, int]
) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events of one complete answer, in the API's order."""
    output = answer.output_tokens if answer.output_tokens is not None else \
        tokens(list(answer.content))
    start = {"id": f"msg_{number}", "type": "message", "role": "assistant", "model": model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(answer.content):
        if block["type"] == "text":
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}}))
            for piece in _pieces(block["text"]):
                events.append(("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": piece}}))
        else:
            events.append(("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"],
                                  "input": {}}}))
            for piece in _pieces(json.dumps(block["input"])):
                events.append(("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _pieces(value: str, size: int = 40) -> list[str]:
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]
