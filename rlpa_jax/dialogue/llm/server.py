"""An OpenAI-compatible chat server over a local model's micro-batcher (launch/serve.py runs it).

    server = ChatServer(("127.0.0.1", 8000), load_model(folder, window_s=0.005, log_level=logging.INFO))
    server.serve_forever()

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /v1/stats (the batcher's calls, requests
and mean batch size) and GET /health. Each request is handled on its own thread and waits for its
answer from the model's MicroBatcher, so concurrent requests share generation calls.

Accepted request fields: `model` (the served name; another is 404), `messages` (a non-empty list of
{"role": system|user|assistant, "content": text or a list of {"type": "text", "text": ...}}),
`temperature` (0..2, default 1 as the OpenAI API; 0 is greedy), `max_tokens` or
`max_completion_tokens` (default --max-tokens), `top_p`, `n`, `stop` (a string or up to 4: the
reply is cut at the first, after generation; generation itself ends at the model's stop tokens)
and `seed` (ignored: a call's key is derived from its prompts). `stream: true`, tools and
logprobs are refused; other fields (penalties, user, ...) are ignored. A malformed request gets a
4xx JSON error in the OpenAI format ({"error": {"message", "type", "param", "code"}}); nothing a
client sends stops the server.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlpa_jax.dialogue.llm.local import LocalModel, LocalReply, LocalRequest, RejectedRequest
from rlpa_jax.generation.sampler import SamplingParams

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4
MAX_SAMPLES = 16
REFUSED_FIELDS = {"stream": "streaming is not supported; send stream=false",
                  "tools": "tool calls are not supported", "functions": "function calls are not supported",
                  "logprobs": "logprobs are not returned"}


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    request: LocalRequest
    model: str


def _number(body: dict, name: str, default: float, low: float, high: float, *, integer: bool = False,
            open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()) \
            or not math.isfinite(value):
        raise RequestError(400, f"'{name}' must be {kind}, got {value!r}", name)
    if value < low or value > high or (open_low and value == low):
        bounds = f"{'>' if open_low else '>='} {low:g} and <= {high:g}"
        raise RequestError(400, f"'{name}'={value!r} must be {bounds}", name)
    return int(value) if integer else float(value)


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise RequestError(400, f"messages[{index}].content must be a string or a list of text parts "
                            f"({{'type': 'text', 'text': ...}}), got {content!r}"[:500], f"messages[{index}].content")


def parse_chat_request(raw: bytes, served_model: str, default_max_tokens: int) -> ChatRequest:
    """A /v1/chat/completions body as a LocalRequest; RequestError says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise RequestError(400, f"'model' must be a string, got {model!r}", "model")
    if model != served_model:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {served_model!r}", "model",
                           "model_not_found")
    for name, why in REFUSED_FIELDS.items():
        if body.get(name):
            raise RequestError(400, why, name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects",
                           "messages")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"messages[{index}] must be an object whose 'role' is one of {', '.join(ROLES)}",
                               f"messages[{index}]")
        cleaned.append({"role": message["role"], "content": _content(message, index)})
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = SamplingParams(
        max_new_tokens=_number(body, max_tokens_name, default_max_tokens, 1, 1 << 20, integer=True),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        num_samples=_number(body, "n", 1, 1, MAX_SAMPLES, integer=True))
    return ChatRequest(LocalRequest(cleaned, sampling, tuple(stop)), model)


def chat_completion(reply: LocalReply, model: str) -> dict:
    """The OpenAI chat.completion object of a reply."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": choice.text},
                     "finish_reason": choice.finish_reason, "logprobs": None}
                    for i, choice in enumerate(reply.choices)],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
    }


class ChatServer(ThreadingHTTPServer):
    """Serves one LocalModel under `model_name` (default: its folder's name)."""

    daemon_threads = True
    request_queue_size = 256  # the listen backlog: socketserver's 5 resets a burst of concurrent clients

    def __init__(self, address: tuple[str, int], model: LocalModel, model_name: str | None = None,
                 default_max_tokens: int = 512):
        self.model, self.model_name = model, model_name or model.name
        self.default_max_tokens = default_max_tokens
        self.started = int(time.time())
        super().__init__(address, ChatHandler)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.started,
                                            "owned_by": "rlpa-jax"}]}

    def complete(self, raw: bytes) -> dict:
        chat = parse_chat_request(raw, self.model_name, self.default_max_tokens)
        [future] = self.model.batcher.submit([chat.request])
        try:
            reply = future.result()
        except RejectedRequest as error:  # too long a prompt, messages the chat template refuses
            raise RequestError(400, str(error), "messages") from None
        return chat_completion(reply, chat.model)


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai SDK reuses its connections

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        routes = {"/v1/models": self.server.models, "/models": self.server.models,
                  "/v1/stats": self.server.model.batcher.stats, "/health": lambda: {"status": "ok"}}
        route = routes.get(self.path.split("?", 1)[0].rstrip("/"))
        if route is None:
            self._send(404, RequestError(404, f"no route GET {self.path}", code="not_found").body())
        else:
            self._send(200, route())

    def do_POST(self) -> None:  # noqa: N802
        try:
            raw = self._body()
            if self.path.split("?", 1)[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                raise RequestError(404, f"no route POST {self.path}; use /v1/chat/completions", code="not_found")
            self._send(200, self.server.complete(raw))
        except RequestError as error:
            self._send(error.status, error.body())
        except Exception as error:  # a bug or an engine failure: this request fails, the server stays up
            logger.exception("request failed")
            self._send(500, RequestError(500, f"internal error: {type(error).__name__}: {error}",
                                         kind="server_error").body())

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        return self.rfile.read(int(length))

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s - %s", self.address_string(), format % args)
