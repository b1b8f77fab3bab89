"""Requests and tokens per minute for one endpoint, shared by every client of it in the process.

With several processes (a multi-host run), each process keeps an equal share of the endpoint's
limits (`RateLimits.share`, applied by dialogue/llm.py): the processes never exchange their counts,
so the shares are what keeps their sum under the budget.

A provider's rate limit belongs to the endpoint (its URL and model), not to a role: the simulated
user and both judges on gpt-4o-mini draw from one budget. `shared_limiter` hands every client of
one endpoint the same `RateLimiter`, which keeps two promises:

- a hard cap: no window of `window_s` (60 s: requests and tokens *per minute*) as the server
  counts it ever holds more than `rpm` requests or `tpm` tokens. The server counts a request
  somewhere between our send and its answer, so a request keeps its place in the window until
  `window_s` after its answer (or failure); then no delay between us and the server (connection
  set-up, a slow network) can crowd one window. The price is the answer's latency per window:
  ~2 % of a minute for a 1.25 s answer;
- pacing, not bursts: request starts are spaced `window_s / rpm` apart, since providers also
  enforce limits in sub-minute slices, where a burst of a whole minute's budget is a 429.

Tokens are estimated before the call (prompt characters / 4 + max_tokens) and held as in flight;
the answer's usage replaces the estimate (`release`). A 429's Retry-After pauses the whole
endpoint (`pause`): requests waiting for a slot inside the pause take a new slot after it.

The limiter holds no asyncio object (a threading lock around its bookkeeping and plain
`asyncio.sleep`), so it outlives event loops: the rollout's repeated `asyncio.run` calls and
`run_sync` from a worker thread share it safely. Nothing busy-waits: a request sleeps until its
paced slot, and, when the window is full, until the entry that frees it expires.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

CHARS_PER_TOKEN = 4  # the usual estimate for English text with GPT-style tokenizers
TOKENS_PER_MESSAGE = 4  # role and separators the chat template adds around each message
MIN_POLL_S = 0.01  # when only requests still in flight fill the window, look again this often


@dataclass(frozen=True)
class RateLimits:
    """At most `rpm` requests and `tpm` tokens in any `window_s` (None: that limit is off)."""

    rpm: float | None = None
    tpm: float | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"RateLimits.{name}={value} must be > 0 (or None for no limit)")
        if not self.window_s > 0:
            raise ValueError(f"RateLimits.window_s={self.window_s} must be > 0")

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def share(self, processes: int) -> "RateLimits":
        """One of `processes` equal shares of these limits: what each process of a multi-host run
        may use, so that together they keep the endpoint's budget (each plays an equal share of
        the conversations, so each needs about as much)."""
        if processes < 1:
            raise ValueError(f"processes={processes} must be >= 1")
        divide = lambda limit: None if limit is None else limit / processes  # noqa: E731
        return RateLimits(divide(self.rpm), divide(self.tpm), self.window_s)


def estimate_tokens(messages: Sequence[Mapping[str, Any]], max_tokens: int) -> int:
    """What a request may cost before it is sent: its prompt at ~4 characters per token plus
    the whole completion it may write (replaced by the real usage once it is known)."""
    characters = sum(len(str(message.get("content", ""))) for message in messages)
    return math.ceil(characters / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + int(max_tokens)


class RateLimiter:
    """Paces request starts and caps every window for one endpoint; see the module docstring.

    Every `acquire` that returns must be matched by one `release` (the client does it in a
    `finally`), which is when the request's place in the window starts to count down.
    """

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._interval = limits.window_s / limits.rpm if limits.rpm else 0.0
        self._max_requests = math.floor(limits.rpm) if limits.rpm else None  # whole requests per window
        self._next_start = -math.inf  # the paced schedule's next free slot
        self._paused_until = -math.inf
        self._finished: deque[tuple[float, int]] = deque()  # (leaves the window at, tokens), in order
        self._finished_tokens = 0
        self._in_flight = 0
        self._in_flight_tokens = 0
        self.pauses = 0

    def _reserve(self, now: float) -> float:
        start = max(now, self._paused_until, self._next_start)
        self._next_start = start + self._interval
        return start

    def _expire(self, now: float) -> None:
        while self._finished and self._finished[0][0] <= now:
            self._finished_tokens -= self._finished.popleft()[1]

    def _window_frees_at(self, tokens: int, now: float) -> float | None:
        """None when one more request of `tokens` fits the window now; else when to look again."""
        waits = []
        if self._max_requests is not None:
            excess = len(self._finished) + self._in_flight + 1 - self._max_requests
            if excess > 0:
                waits.append(self._finished[excess - 1][0] if excess <= len(self._finished) else None)
        if self.limits.tpm is not None:
            used = self._finished_tokens + self._in_flight_tokens
            # A request larger than the whole budget may go alone into an empty window.
            if used + tokens > self.limits.tpm and used > 0:
                excess, frees = used + tokens - self.limits.tpm, None
                for leaves_at, finished_tokens in self._finished:
                    excess -= finished_tokens
                    if excess <= 0:
                        frees = leaves_at
                        break
                waits.append(frees)
        if not waits:
            return None
        # None: requests still in flight hold the window; their answers will free it.
        return max(now + max(self._interval, MIN_POLL_S) if wait is None else wait for wait in waits)

    async def acquire(self, tokens: int) -> float:
        """Wait until this request may start; returns the seconds waited."""
        if not self.limits.active:
            return 0.0
        with self._lock:
            now = self._clock()
            start = self._reserve(now)
        waited = 0.0
        while True:
            if start > now:
                await asyncio.sleep(start - now)
                waited += start - now
            with self._lock:
                now = self._clock()
                if now < self._paused_until:  # paused after the reservation: this slot is gone
                    start = self._reserve(now)
                    continue
                self._expire(now)
                frees_at = self._window_frees_at(tokens, now)
                if frees_at is None:
                    self._in_flight += 1
                    self._in_flight_tokens += tokens
                    return waited
                start = frees_at
                # Later reservations queue behind the full window instead of waking into it.
                self._next_start = max(self._next_start, frees_at + self._interval)

    def release(self, estimated_tokens: int, actual_tokens: int) -> None:
        """The request is over (answered, failed or cancelled): from now it leaves the window in
        window_s, counted with its real tokens (0 for one the server refused)."""
        if not self.limits.active:
            return
        with self._lock:
            self._in_flight -= 1
            self._in_flight_tokens -= estimated_tokens
            self._finished.append((self._clock() + self.limits.window_s, actual_tokens))
            self._finished_tokens += actual_tokens

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
