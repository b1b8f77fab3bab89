"""Requests and tokens per minute for one endpoint, shared by every client of it in the process.

A provider's rate limit belongs to the endpoint (its URL and model), not to a role: the simulated
user and both judges on gpt-4o-mini draw from one budget. `shared_limiter` hands every client of
one endpoint the same `RateLimiter`, which paces request starts so that no window of `window_s`
(60 s: requests and tokens *per minute*) ever holds more than the limit:

- pacing, not bursts: starts are spaced `(window_s + margin) / limit` apart, so any window of
  window_s holds fewer than `limit` starts even when the server sees each request up to margin/2
  later or earlier than we sent it (a token bucket with a full window of burst would allow twice
  the limit in one window; providers also enforce in sub-minute slices, where a burst is a 429);
- tokens are estimated before the call (prompt characters / 4 + max_tokens) and the schedule is
  corrected from the answer's usage once it is known (`settle`);
- a 429's Retry-After pauses the whole endpoint (`pause`): requests that were waiting for a slot
  inside the pause take a new slot after it, so the pause ends without a burst.

The limiter holds no asyncio object (a threading lock around its arithmetic and plain
`asyncio.sleep`), so it outlives event loops: the rollout's repeated `asyncio.run` calls and
`run_sync` from a worker thread share it safely. Nothing busy-waits: a request sleeps once until
its own slot (again only when a pause moved it).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

CHARS_PER_TOKEN = 4  # the usual estimate for English text with GPT-style tokenizers
TOKENS_PER_MESSAGE = 4  # role and separators the chat template adds around each message


@dataclass(frozen=True)
class RateLimits:
    """At most `rpm` requests and `tpm` tokens in any `window_s` (None: that limit is off).

    `margin` (a fraction of the window) is the slack left for the time between our send and the
    server's count: pacing spreads `limit` requests over window_s * (1 + margin).
    """

    rpm: float | None = None
    tpm: float | None = None
    window_s: float = 60.0
    margin: float = 0.02

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"RateLimits.{name}={value} must be > 0 (or None for no limit)")
        if not self.window_s > 0 or not self.margin >= 0:
            raise ValueError(f"RateLimits: window_s={self.window_s} must be > 0 and margin={self.margin} >= 0")

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def interval_s(self, limit: float | None) -> float:
        """Seconds one unit (a request, a token) occupies in the schedule."""
        return 0.0 if limit is None else self.window_s * (1.0 + self.margin) / limit


def estimate_tokens(messages: Sequence[Mapping[str, Any]], max_tokens: int) -> int:
    """What a request may cost before it is sent: its prompt at ~4 characters per token plus
    the whole completion it may write (settled against the real usage afterwards)."""
    characters = sum(len(str(message.get("content", ""))) for message in messages)
    return math.ceil(characters / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + int(max_tokens)


class RateLimiter:
    """Paces request starts for one endpoint; see the module docstring."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._request_interval = limits.interval_s(limits.rpm)
        self._token_interval = limits.interval_s(limits.tpm)
        self._next_request = -math.inf  # earliest start the request schedule allows
        self._next_token = -math.inf  # earliest start the token schedule allows
        self._paused_until = -math.inf
        self.pauses = 0

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def _reserve(self, tokens: int) -> tuple[float, float]:
        """(now, this request's start): the first moment every schedule and any pause allow."""
        with self._lock:
            now = self._clock()
            start = max(now, self._paused_until, self._next_request, self._next_token)
            self._next_request = start + self._request_interval
            self._next_token = start + tokens * self._token_interval
            return now, start

    def _paused_now(self) -> bool:
        with self._lock:
            return self._clock() < self._paused_until

    async def acquire(self, tokens: int) -> float:
        """Wait for this request's slot; returns the seconds waited."""
        if not self.limits.active:
            return 0.0
        waited = 0.0
        while True:
            now, start = self._reserve(tokens)
            if start > now:
                await asyncio.sleep(start - now)
                waited += start - now
            # A pause that began after the reservation and still runs: this slot is gone.
            if not self._paused_now():
                return waited

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token schedule once the answer's usage is known."""
        if self.limits.tpm is None:
            return
        with self._lock:
            self._next_token += (actual_tokens - estimated_tokens) * self._token_interval

    def pause(self, seconds: float) -> None:
        """The server asked for a break (429 + Retry-After): no request starts for `seconds`."""
        with self._lock:
            until = self._clock() + max(seconds, 0.0)
            if until > self._paused_until:
                self._paused_until = until
                self.pauses += 1


_LIMITERS: "weakref.WeakValueDictionary[tuple, RateLimiter]" = weakref.WeakValueDictionary()
_LIMITERS_LOCK = threading.Lock()


def shared_limiter(base_url: str, model: str, limits: RateLimits) -> RateLimiter:
    """The process's limiter for (base_url, model): every client of that endpoint with the same
    limits gets the same one (it lives while a client holds it). The config refuses roles that
    give one endpoint different limits; a client built in code with other limits gets its own."""
    key = (base_url.rstrip("/"), model, limits)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = RateLimiter(limits)
            _LIMITERS[key] = limiter
        return limiter
