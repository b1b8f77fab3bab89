"""The one chat client behind every LLM role.

Simulated users, judges, persona conversion and API-served policies all call an
OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM, SGLang, launch/serve.py, ...)
or, with `backend="local"`, a Hugging Face Qwen2 folder sampled in process by the generation
engine (dialogue/llm/local.py: one weight copy per folder, a turn's requests batched into one
generation call, no HTTP), through `LLMClient`, which adds what training needs on top of
`openai.AsyncOpenAI` (the local backend gets the same retries, cache and usage counters; it has
no rate limits, timeouts or JSON mode):

- bounded concurrency (one asyncio.Semaphore of `max_concurrency` in-flight requests);
- requests and tokens per minute (`rpm`, `tpm`) paced by one limiter per endpoint, shared by
  every client of that endpoint in the process (llm_limiter.py); a 429's Retry-After pauses it;
- a hard per-request timeout (`timeout_s`), so a hanging server cannot stall a rollout;
- our own retries (the SDK's are switched off) with exponential backoff and full
  jitter on 429, 5xx, timeouts, connection errors and malformed responses,
  honouring Retry-After (capped by `backoff_max_s`); other 4xx fail at once;
- an append-only JSONL cache keyed by the request, so reruns and duplicate
  requests cost nothing (identical requests in flight share one HTTP call);
- usage counters for metrics logs: calls, retries, failures, 429s, cache hits, latencies,
  tokens and, with prices per million tokens, cost (llm_usage.py).

The API key is read from the environment variable named by `api_key_env` and
only handed to the SDK: it never appears in logs, reprs, errors or the cache.

Async callers use `await client.complete(...)` / `complete_many(...)`; code
outside asyncio wraps a coroutine in `run_sync(...)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Sequence, TypeVar

import openai

from rlpa_jax.config.llm_sections import LLMSection
from rlpa_jax.config.options import ConfigError
from rlpa_jax.dialogue.llm.cache import ResponseCache, cache_key
from rlpa_jax.dialogue.llm.limiter import estimate_tokens, shared_limiter
from rlpa_jax.dialogue.llm.local import LocalRequest, LocalTransport, shared_model
from rlpa_jax.dialogue.llm.requests import REDACTED, LLMCallError, redact_url, validate_messages
from rlpa_jax.dialogue.llm.retries import AttemptFailure, backoff_delay_s, classify_failure, completion_text
from rlpa_jax.dialogue.llm.settings import LLMConfig
from rlpa_jax.dialogue.llm.usage import LLMUsage
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.runtime import multihost

logger = logging.getLogger(__name__)

PLACEHOLDER_API_KEY = "EMPTY"  # what local vLLM / SGLang servers accept when they check no key
T = TypeVar("T")


# ---------------------------------------------------------------------------
# Client


@dataclass
class _LoopState:
    """SDK client and semaphore for one event loop: both bind to the loop that first uses them
    (the local backend has no SDK client: `sdk` and `closer` are None)."""

    loop: asyncio.AbstractEventLoop
    semaphore: asyncio.Semaphore
    sdk: openai.AsyncOpenAI | None
    closer: AsyncGenerator[None, None] | None
    in_flight: dict[str, asyncio.Task] = field(default_factory=dict)


async def close_at_loop_shutdown(sdk: openai.AsyncOpenAI) -> AsyncGenerator[None, None]:
    """Suspended for the loop's life; closes `sdk` when the loop shuts down or the generator is closed.

    asyncio.run() finalizes open async generators before closing its loop, so pooled
    connections are closed on the loop that owns them, even when callers never
    aclose() (e.g. repeated run_sync calls). Without this, the SDK's __del__ would
    try to close them later on a different loop and log 'Event loop is closed'.
    """
    try:
        yield
    finally:
        await sdk.close()


class LLMClient:
    """Async chat completions with concurrency limits, timeouts, retries, a cache and usage counters.

    One client may be driven by several event loops one after another (e.g. repeated
    `run_sync` calls): connections and the semaphore are rebuilt for each new loop.
    Use it from one thread at a time.
    """

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.usage = LLMUsage()
        self.prices = config.prices
        # One limiter per endpoint in the process: every role on it draws from one budget, this
        # process's share of it when several processes split the conversations.
        self.limiter = shared_limiter(config.endpoint, config.model, config.limits.share(multihost.joined_processes()))
        local = config.backend == "local"
        # Local: the folder's one shared model; this role's requests of a turn go to it together.
        self._local = LocalTransport(shared_model(config.checkpoint), config.max_concurrency) if local else None
        self._api_key = PLACEHOLDER_API_KEY if local else read_api_key(config.api_key_env)
        self._cache = ResponseCache(config.cache_path) if config.cache_path else None
        self._rng = random.Random()
        self._state: _LoopState | None = None
        self._public_base_url = redact_url(config.endpoint)

    def __repr__(self) -> str:
        return (
            f"LLMClient(model={self.config.model!r}, base_url={self._public_base_url!r}, "
            f"api_key_env={self.config.api_key_env!r}, cache_path={self.config.cache_path!r})"
        )

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close this loop's HTTP connections (connections of loops already gone are dropped)."""
        state, self._state = self._state, None
        if state is None or state.loop is not asyncio.get_running_loop():
            return
        for task in list(state.in_flight.values()):
            task.cancel()
        if state.closer is not None:
            await state.closer.aclose()

    async def complete(self, messages: list[dict], *, temperature: float | None = None,
                       max_tokens: int | None = None, json_mode: bool = False) -> str:
        """The assistant's reply text to `messages`; raises LLMCallError when it cannot be had.

        temperature / max_tokens default to the config's; json_mode asks for a JSON object.
        """
        validate_messages(messages)
        temperature = self.config.temperature if temperature is None else temperature
        max_tokens = self.config.max_tokens if max_tokens is None else max_tokens
        self.usage.calls += 1
        try:
            if self._cache is None:
                return await self._request_with_retries(messages, temperature, max_tokens, json_mode)
            return await self._cached_answer(self._cache, messages, temperature, max_tokens, json_mode)
        except LLMCallError:
            self.usage.failures += 1
            raise

    async def complete_many(self, batch: Sequence[list[dict]], **kw: Any) -> list[str | LLMCallError]:
        """complete() for every item concurrently (bounded by max_concurrency), in order.

        An item that fails yields its LLMCallError in place; the batch itself never raises for it.
        """
        return list(await asyncio.gather(*(self._complete_or_error(messages, **kw) for messages in batch)))

    async def probe(self) -> None:
        """One one-token request past the cache: raises LLMCallError when the endpoint does not
        answer (checked at start-up, before hours of work depend on it). A local model answers by
        construction: its folder was loaded when the client was made."""
        if self._local is not None:
            return
        request = {"model": self.config.model, "messages": [{"role": "user", "content": "Reply with OK."}],
                   "temperature": 0.0, "max_tokens": 1}
        try:
            await self._attempt(request)
        except Exception as error:
            raise self._call_error([classify_failure(error, self.config.timeout_s)], 1) from None

    async def _complete_or_error(self, messages: list[dict], **kw: Any) -> str | LLMCallError:
        try:
            return await self.complete(messages, **kw)
        except LLMCallError as error:
            return error

    async def _cached_answer(self, cache: ResponseCache, messages: list[dict], temperature: float,
                             max_tokens: int, json_mode: bool) -> str:
        key = cache_key(self.config.endpoint, self.config.model, messages, temperature, max_tokens, json_mode)
        cached = cache.get(key)
        if cached is not None:
            self.usage.cache_hits += 1
            return cached
        in_flight = (await self._loop_state()).in_flight
        task = in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._request_and_cache(cache, key, messages, temperature, max_tokens,
                                                                 json_mode))
            in_flight[key] = task
            task.add_done_callback(lambda done, key=key: forget_task(in_flight, key, done))
            # shield: one caller being cancelled must not cancel the answer others wait for.
            return await asyncio.shield(task)
        # An identical request is already on the wire; its answer is this call's answer.
        content = await asyncio.shield(task)
        self.usage.cache_hits += 1
        return content

    async def _request_and_cache(self, cache: ResponseCache, key: str, messages: list[dict], temperature: float,
                                 max_tokens: int, json_mode: bool) -> str:
        content = await self._request_with_retries(messages, temperature, max_tokens, json_mode)
        cache.put(key, content)
        return content

    async def _request_with_retries(self, messages: list[dict], temperature: float, max_tokens: int,
                                    json_mode: bool) -> str:
        request = {
            "model": self.config.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if json_mode:
            request["response_format"] = {"type": "json_object"}
        failures: list[AttemptFailure] = []
        max_attempts = self.config.max_retries + 1
        for attempt in range(max_attempts):
            if attempt > 0:
                delay_s = backoff_delay_s(attempt - 1, self.config.backoff_initial_s, self.config.backoff_max_s,
                                          failures[-1].retry_after_s, self._rng)
                logger.debug("LLM %s at %s: %s; retry %d/%d in %.3fs", self.config.model, self._public_base_url,
                             self._scrub(failures[-1].describe()), attempt, self.config.max_retries, delay_s)
                self.usage.retries += 1
                await asyncio.sleep(delay_s)
            try:
                return await self._attempt(request)
            except Exception as error:
                failure = classify_failure(error, self.config.timeout_s)
                failures.append(failure)
                self._note_rate_limit(failure)
                if not failure.retryable:
                    # Chain only our own surprises: server errors carry raw bodies that may echo the key.
                    cause = error if failure.status == "unexpected error" else None
                    raise self._call_error(failures, max_attempts) from cause
        raise self._call_error(failures, max_attempts)

    async def _attempt(self, request: dict[str, Any]) -> str:
        if self._local is not None:
            return await self._local_attempt(request)
        state = await self._loop_state()
        estimated = estimate_tokens(request["messages"], request["max_tokens"])
        async with state.semaphore:
            # The slot is taken while holding the semaphore: a request that waited for its slot
            # sends at once, so concurrency limits never bunch paced starts into a burst.
            self.usage.wait_s += await self.limiter.acquire(estimated)
            self.usage.requests += 1
            started = time.perf_counter()
            try:
                # The SDK timeout is per network phase; wait_for bounds the whole exchange.
                response = await asyncio.wait_for(state.sdk.chat.completions.create(**request),
                                                  timeout=self.config.timeout_s)
            except BaseException as error:
                # A refused request spent no tokens; any other may have been served.
                self.limiter.release(estimated, 0 if isinstance(error, openai.RateLimitError) else estimated)
                raise
            latency_s = time.perf_counter() - started
        prompt_tokens, completion_tokens = usage_tokens(response)
        self.limiter.release(estimated, prompt_tokens + completion_tokens if prompt_tokens or completion_tokens
                             else estimated)
        text = completion_text(response)
        self.usage.latencies_s.append(latency_s)
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        return text

    async def _local_attempt(self, request: dict[str, Any]) -> str:
        """One request answered by the local model: batched with the others of this event-loop turn;
        the latency is the call's (batch wait included), the tokens the real ones."""
        sampling = SamplingParams(max_new_tokens=request["max_tokens"], temperature=request["temperature"])
        self.usage.requests += 1
        started = time.perf_counter()
        reply = await self._local.complete(LocalRequest(request["messages"], sampling))
        self.usage.latencies_s.append(time.perf_counter() - started)
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens
        return reply.text

    def _note_rate_limit(self, failure: AttemptFailure) -> None:
        """A 429 counts, and its Retry-After (capped like retries' waits) pauses the endpoint for
        every client of it, not just this request."""
        if failure.status != "HTTP 429":
            return
        self.usage.rate_limited += 1
        if failure.retry_after_s is not None:
            self.limiter.pause(min(failure.retry_after_s, self.config.backoff_max_s))

    def _call_error(self, failures: Sequence[AttemptFailure], max_attempts: int) -> LLMCallError:
        last = failures[-1]
        reason = "retries exhausted" if last.retryable else f"{last.status} is not retryable"
        attempts = [self._scrub(failure.describe()) for failure in failures]
        listing = "; ".join(f"{number}) {text}" for number, text in enumerate(attempts, start=1))
        message = (
            f"LLM call to model {self.config.model!r} at {self._public_base_url} failed with {last.status} "
            f"after {len(failures)} of at most {max_attempts} attempt(s) ({reason}): {listing}"
        )
        logger.warning("%s", message)
        return LLMCallError(message, model=self.config.model, base_url=self._public_base_url,
                            status=last.status, attempts=attempts)

    def _scrub(self, text: str) -> str:
        """Remove the API key from server-provided text (some servers echo request headers)."""
        if self._api_key and self._api_key != PLACEHOLDER_API_KEY:
            return text.replace(self._api_key, REDACTED)
        return text

    async def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is not None and self._state.loop is loop:
            return self._state
        if self._state is not None:
            logger.debug("LLM client for %s moved to a new event loop; opening fresh connections",
                         self.config.model)
        semaphore = asyncio.Semaphore(self.config.max_concurrency)
        if self._local is not None:
            self._state = _LoopState(loop=loop, semaphore=semaphore, sdk=None, closer=None)
            return self._state
        sdk = openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,  # retries are ours: jitter, Retry-After cap, malformed-body retries
        )
        closer = close_at_loop_shutdown(sdk)
        await closer.__anext__()  # run to its yield so loop shutdown will run its finally
        self._state = _LoopState(loop=loop, semaphore=semaphore, sdk=sdk, closer=closer)
        return self._state


def client_from_section(section: LLMSection, key: str = "llm") -> LLMClient:
    """The client for one role's config section (`key`, e.g. "judges.response.llm", names it in
    errors). Fields left null (unset here and in every section it inherits from) keep
    LLMConfig's defaults; an endpoint without base_url or model, or a local backend without a
    checkpoint, is a ConfigError; a checkpoint that is no Qwen2 folder is a CheckpointError."""
    local = section.backend == "local"
    needed = ("checkpoint",) if local else ("base_url", "model")
    missing = [name for name in needed if getattr(section, name) is None]
    if missing:
        raise ConfigError(f"{key}: no {' or '.join(missing)}; set {', '.join(f'{key}.{m}' for m in missing)} "
                          f"or the shared llm section it inherits from")
    values = {name: getattr(section, name) for name in LLM_SECTION_FIELDS if getattr(section, name) is not None}
    if local:
        model = shared_model(section.checkpoint, f"{key}.checkpoint")  # loads it (once per folder) or says why not
        # The endpoint is the folder: base_url and model (from an openai section above) do not apply.
        values |= {"base_url": f"local:{model.path}", "model": model.name}
    return LLMClient(LLMConfig(**values))


# The config section's fields the client takes (the names are the same on both sides).
LLM_SECTION_FIELDS = ("backend", "checkpoint", "base_url", "model", "api_key_env", "max_concurrency", "timeout_s",
                      "max_retries", "cache_path", "rpm", "tpm", "price_input_per_mtok", "price_output_per_mtok",
                      "temperature", "max_tokens")


def usage_tokens(response: Any) -> tuple[int, int]:
    """(prompt, completion) tokens the answer reports; (0, 0) when it reports none."""
    usage = getattr(response, "usage", None)
    return (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))


def forget_task(in_flight: dict[str, asyncio.Task], key: str, task: asyncio.Task) -> None:
    """Drop a finished shared request; read its outcome so an unawaited failure is not reported as lost."""
    in_flight.pop(key, None)
    if not task.cancelled():
        task.exception()


def read_api_key(env_name: str) -> str:
    """The key from $env_name, or a placeholder that local vLLM/SGLang servers accept."""
    key = os.environ.get(env_name)
    if key:
        return key
    logger.debug("environment variable %s is unset; sending the placeholder API key %r (fine for local "
                 "vLLM/SGLang servers)", env_name, PLACEHOLDER_API_KEY)
    return PLACEHOLDER_API_KEY
