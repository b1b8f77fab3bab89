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

Like a provider, the server can enforce a rate limit and answer slowly:

    OpenAIServer(handler, rate_limit=RateLimit(600, window_s=60), latency_s=(0.5, 2.0))

refuses a request with 429 + Retry-After when `limit` requests were already accepted in the last
`window_s` seconds, and answers each accepted one after a uniform random delay. `arrivals` holds
the arrival time (time.monotonic) of every request, `accepted` those it answered, and
`peak_in_window(times, window_s)` the most in any window: what the server saw.
"""

from __future__ import annotations

import bisect
import email.utils
import itertools
import json
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    """What the server answers to one request.

    status: HTTP status; 200 gives a chat.completion, anything else an error body.
    content: the assistant message text for a 200 (None sends a null content).
    retry_after_s: sent as a Retry-After header when not None (with retry_after_date, as the
        HTTP date that many whole seconds ahead).
    hang_s: seconds to wait before answering (cut short when the server closes).
    malformed: answer 200 with a body that is not JSON.
    error_message: the error body's message for a non-200 status.
    prompt_tokens / completion_tokens: usage to report; None counts words.
    """

    status: int = 200
    content: str | None = "ok"
    retry_after_s: float | None = None
    retry_after_date: bool = False
    hang_s: float = 0.0
    malformed: bool = False
    error_message: str = "scripted error"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


Handler = Callable[[dict], "Reply | str"]


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` accepted requests in any `window_s`; the rest get 429 with Retry-After (the
    seconds until a slot frees, or with `http_date` the moment as an HTTP date, whole seconds)."""

    limit: int
    window_s: float = 60.0
    http_date: bool = False


def http_date_in(seconds: float) -> str:
    """The HTTP date `seconds` from now, rounded up to the whole second the format can say."""
    return email.utils.formatdate(math.ceil(time.time() + seconds), usegmt=True)


def peak_in_window(times: Sequence[float], window_s: float) -> int:
    """The most of `times` that fall in any half-open window [t, t + window_s)."""
    ordered = sorted(times)
    return max((bisect.bisect_left(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0)


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

    def __init__(self, handler: Handler, rate_limit: RateLimit | None = None,
                 latency_s: tuple[float, float] | None = None, seed: int = 0) -> None:
        self.handler = handler
        self.rate_limit = rate_limit
        self.latency_s = latency_s
        self._latency_rng = random.Random(seed)
        self._recent: deque[float] = deque()  # accepted arrival times inside the current window
        self.arrivals: list[float] = []  # every chat-completion request, accepted or not
        self.accepted: list[float] = []
        self.rejected = 0
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

    def _admit(self) -> float | None:
        """None when the request may be served now; else the seconds until the window frees a slot."""
        with self._lock:
            now = time.monotonic()
            self.arrivals.append(now)
            limit = self.rate_limit
            if limit is not None:
                while self._recent and self._recent[0] <= now - limit.window_s:
                    self._recent.popleft()
                if len(self._recent) >= limit.limit:
                    self.rejected += 1
                    return self._recent[0] + limit.window_s - now
                self._recent.append(now)
            self.accepted.append(now)
            return None

    def _latency(self) -> float:
        if self.latency_s is None:
            return 0.0
        with self._lock:
            return self._latency_rng.uniform(*self.latency_s)

    def retry_after_header(self, wait_s: float) -> str:
        if self.rate_limit is not None and self.rate_limit.http_date:
            return http_date_in(wait_s)
        return f"{wait_s:.3f}"

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
                wait_s = server._admit()
                if wait_s is not None:
                    self._send_json(429, error_body(429, "rate limit reached"),
                                    {"Retry-After": server.retry_after_header(wait_s)})
                    return
                server._enter_flight()
                try:
                    reply = server._reply_for(body)
                    delay_s = reply.hang_s + server._latency()
                    if delay_s > 0:
                        server._closing.wait(delay_s)
                    self._answer(body, reply)
                finally:
                    server._leave_flight()

            def _answer(self, body: dict, reply: Reply) -> None:
                headers = {}
                if reply.retry_after_s is not None:
                    headers["Retry-After"] = (http_date_in(reply.retry_after_s) if reply.retry_after_date
                                              else f"{reply.retry_after_s:g}")
                if reply.malformed:
                    self._send(200, b"{this is not json", headers)
                elif reply.status == 200:
                    self._send_json(200, chat_completion_body(body, reply, next(server._completion_ids)), headers)
                else:
                    self._send_json(reply.status, error_body(reply.status, reply.error_message), headers)

        return ChatCompletionsHandler
