"""Why an LLM call attempt failed and how long to wait before the next one: status, retry-ability,
Retry-After headers, exponential backoff with jitter."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

import openai


def backoff_delay_s(retry_index: int, initial_s: float, max_s: float, retry_after_s: float | None,
                    rng: random.Random) -> float:
    """Seconds to wait before retry number `retry_index` (0-based).

    The server's Retry-After wins when given (capped by max_s); otherwise full
    jitter: uniform in [0, min(max_s, initial_s * 2**retry_index)].
    """
    if retry_after_s is not None:
        return min(max(retry_after_s, 0.0), max_s)
    ceiling = min(max_s, initial_s * (2.0 ** retry_index))
    return rng.uniform(0.0, ceiling)


def parse_retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from retry-after-ms, or Retry-After as seconds or an HTTP date; None when absent/unreadable."""
    if not headers:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return float(milliseconds) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(moment.timestamp() - time.time(), 0.0)


class MalformedResponseError(ValueError):
    """A 200 answer that is not a usable chat completion."""


def completion_text(response: Any) -> str:
    """The first choice's message text; MalformedResponseError when it is missing."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedResponseError("response has no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        raise MalformedResponseError(f"choices[0].message.content is {type(content).__name__}, not text")
    return content


@dataclass(frozen=True)
class AttemptFailure:
    """Why one HTTP attempt failed and whether trying again can help."""

    status: str
    detail: str
    retryable: bool
    retry_after_s: float | None = None

    def describe(self) -> str:
        text = f"{self.status}: {self.detail}" if self.detail else self.status
        if self.retry_after_s is not None:
            text += f" (retry-after {self.retry_after_s:g}s)"
        return text


def classify_failure(error: BaseException, timeout_s: float) -> AttemptFailure:
    """Map an exception from one attempt to a retry decision (429/5xx/timeouts/garbage retry)."""
    if isinstance(error, (asyncio.TimeoutError, openai.APITimeoutError)):
        return AttemptFailure("timeout", f"no answer within {timeout_s:g}s", retryable=True)
    if isinstance(error, openai.APIConnectionError):
        return AttemptFailure("connection error", str(error), retryable=True)
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        retryable = status == 429 or status >= 500
        retry_after_s = parse_retry_after_s(error.response.headers) if retryable else None
        return AttemptFailure(f"HTTP {status}", str(error.message), retryable, retry_after_s)
    if isinstance(error, (json.JSONDecodeError, openai.APIResponseValidationError, MalformedResponseError)):
        return AttemptFailure("malformed response", str(error), retryable=True)
    return AttemptFailure("unexpected error", f"{type(error).__name__}: {error}", retryable=False)
