"""What a chat request must hold, and how a failed one is told: message validation, URLs with
their credentials redacted for logs and errors, and LLMCallError."""

from __future__ import annotations

from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"


class LLMCallError(RuntimeError):
    """A chat completion that failed for good: retries exhausted or an unretryable error.

    `status` describes the last failure ("HTTP 429", "timeout", "connection error",
    "malformed response", ...); `attempts` lists every attempt's failure in order.
    """

    def __init__(self, message: str, *, model: str, base_url: str, status: str, attempts: Sequence[str]) -> None:
        super().__init__(message)
        self.model = model
        self.base_url = base_url
        self.status = status
        self.attempts = tuple(attempts)


def redact_url(url: str) -> str:
    """The URL without any user:password@ part, safe for logs and errors."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"messages[{index}]={message!r} must be a dict with 'role' and 'content' keys"
            )
