"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

Tests script what the "LLM" answers with a handler (request JSON -> Reply) and
talk to it over real HTTP, so client code is exercised end to end: status
codes, Retry-After headers, hanging requests, malformed bodies and usage.

    with OpenAIServer(scripted(Reply(status=429), Reply(content="hi"))) as server:
        client = LLMClient(LLMConfig(base_url=server.base_url, model="m"))
        ...
        server.requests        # parsed JSON bodies, in arrival order
        server.max_in_flight   # most requests handled at the same moment

A handler may also return a plain str, short for Reply(content=that_str).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    """What the server answers to one request.

    status: HTTP status; 200 gives a chat.completion, anything else an error body.
    content: the assistant message text for a 200 (None sends a null content).
    retry_after_s: sent as a Retry-After header when not None.
    hang_s: seconds to wait before answering (cut short when the server closes).
    malformed: answer 200 with a body that is not JSON.
    error_message: the error body's message for a non-200 status.
    prompt_tokens / completion_tokens: usage to report; None counts words.
    """

    status: int = 200
    content: str | None = "ok"
    retry_after_s: float | None = None
    hang_s: float = 0.0
    malformed: bool = False
    error_message: str = "scripted error"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


Handler = Callable[[dict], "Reply | str"]


def scripted(*replies: Reply | str) -> Handler:
    """A handler that plays `replies` in order, then repeats the last one forever."""
    if not replies:
        raise ValueError("scripted() needs at least one Reply to play")
    lock = threading.Lock()
    position = itertools.count()

    def handler(_request: dict) -> Reply | str:
        with lock:
            index = next(position)
        return replies[min(index, len(replies) - 1)]

    return handler


def count_words(text: str) -> int:
    return len(text.split())


def prompt_word_count(request: dict) -> int:
    messages = request.get("messages") or []
    return sum(count_words(str(m.get("content", ""))) for m in messages if isinstance(m, dict))


def chat_completion_body(request: dict, reply: Reply, completion_id: int) -> dict:
    prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else prompt_word_count(request)
    completion_tokens = (
        reply.completion_tokens if reply.completion_tokens is not None else count_words(reply.content or "")
    )
    return {
        "id": f"chatcmpl-test-{completion_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(request.get("model", "test-model")),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(status: int, message: str) -> dict:
    kind = "rate_limit_error" if status == 429 else ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


class OpenAIServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port> serving /v1/chat/completions."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[dict] = []
        self.request_headers: list[dict[str, str]] = []
        self.handler_errors: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._completion_ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._make_request_handler())
        # Handler threads must never keep the test process alive (e.g. a hung request).
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "OpenAIServer":
        if self._thread is None:
            # A short poll interval keeps close() fast (shutdown waits for one poll).
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="openai-test-server", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        # Wake hung handlers first so they finish instead of sleeping out hang_s.
        self._closing.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- request handling (runs on the server's handler threads) --

    def _record(self, body: dict, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append(body)
            self.request_headers.append(headers)

    def _enter_flight(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave_flight(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _reply_for(self, body: dict) -> Reply:
        try:
            reply = self.handler(body)
        except Exception as error:  # a broken test handler should show up, not hang the client
            with self._lock:
                self.handler_errors.append(repr(error))
            return Reply(status=500, content=f"test handler raised {error!r}")
        return Reply(content=reply) if isinstance(reply, str) else reply

    def _make_request_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class ChatCompletionsHandler(BaseHTTPRequestHandler):
            # Keep-alive like vLLM/OpenAI, so clients reuse pooled connections as in production.
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; Nagle would add ~40 ms per reply.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
                return

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass  # the client gave up (e.g. its timeout fired); nothing to answer

            def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(body).encode("utf-8"), headers or {})

            def do_GET(self) -> None:
                self._send_json(404, error_body(404, f"no GET route {self.path}; POST {CHAT_COMPLETIONS_PATH}"))

            def do_POST(self) -> None:
                if self.path.rstrip("/") != CHAT_COMPLETIONS_PATH:
                    self._send_json(404, error_body(404, f"unknown path {self.path}; use {CHAT_COMPLETIONS_PATH}"))
                    return
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as error:
                    self._send_json(400, error_body(400, f"request body is not JSON: {error}"))
                    return
                server._record(body, {k.lower(): v for k, v in self.headers.items()})
                server._enter_flight()
                try:
                    reply = server._reply_for(body)
                    if reply.hang_s > 0:
                        server._closing.wait(reply.hang_s)
                    self._answer(body, reply)
                finally:
                    server._leave_flight()

            def _answer(self, body: dict, reply: Reply) -> None:
                headers = {}
                if reply.retry_after_s is not None:
                    headers["Retry-After"] = f"{reply.retry_after_s:g}"
                if reply.malformed:
                    self._send(200, b"{this is not json", headers)
                elif reply.status == 200:
                    self._send_json(200, chat_completion_body(body, reply, next(server._completion_ids)), headers)
                else:
                    self._send_json(reply.status, error_body(reply.status, reply.error_message), headers)

        return ChatCompletionsHandler
