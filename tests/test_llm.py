"""LLMClient against a real OpenAI-compatible HTTP server on 127.0.0.1.

Covers concurrency limits, retries (429 / 5xx / timeouts / malformed bodies),
fail-fast 4xx, Retry-After, the JSONL cache, key hygiene, usage counters and run_sync.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import re
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from openai_server import OpenAIServer, Reply, scripted

from rlpa_jax.dialogue.llm import cache as response_cache
from rlpa_jax.dialogue.llm.cache import ResponseCache, cache_key
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.llm.requests import LLMCallError
from rlpa_jax.dialogue.llm.retries import backoff_delay_s, parse_retry_after_s
from rlpa_jax.dialogue.llm.sync import run_sync

SECRET_KEY = "sk-test-secret-7f3a9c"
KEY_ENV = "RLPA_TEST_LLM_KEY"
# timeout_s: a hang guard, never reached by an answering server however loaded the machine (the
# timeout tests set their own).
FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, timeout_s=60.0)
# A request the server holds far past any client timeout here, even on a loaded machine (closing
# the server cuts it short): a client that waited it out would get this reply, not the retry's.
HANG_S = 60.0


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    return SECRET_KEY


def make_client(server: OpenAIServer, **overrides: object) -> LLMClient:
    settings = dict(base_url=server.base_url, model="test-model", api_key_env=KEY_ENV, **FAST)
    settings.update(overrides)
    return LLMClient(LLMConfig(**settings))


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def last_user_text(request: dict) -> str:
    return request["messages"][-1]["content"]


async def complete_then_close(client: LLMClient, messages: list[dict], **kw: object) -> str:
    try:
        return await client.complete(messages, **kw)
    finally:
        await client.aclose()


def call(client: LLMClient, messages: list[dict], **kw: object) -> str:
    return asyncio.run(complete_then_close(client, messages, **kw))


def call_error(client: LLMClient, messages: list[dict], **kw: object) -> LLMCallError:
    with pytest.raises(LLMCallError) as caught:
        call(client, messages, **kw)
    return caught.value


# --- happy path and request shape -------------------------------------------------


def test_complete_returns_text_and_sends_the_request_we_asked_for() -> None:
    with OpenAIServer(lambda request: f"echo: {last_user_text(request)}") as server:
        client = make_client(server, temperature=0.3, max_tokens=77)
        assert call(client, user("hello")) == "echo: hello"
        assert call(client, user("json please"), json_mode=True, temperature=0.9, max_tokens=5) == "echo: json please"
    plain, json_request = server.requests
    assert plain["model"] == "test-model"
    assert plain["messages"] == user("hello")
    assert plain["temperature"] == 0.3 and plain["max_tokens"] == 77
    assert "response_format" not in plain
    assert json_request["response_format"] == {"type": "json_object"}
    assert json_request["temperature"] == 0.9 and json_request["max_tokens"] == 5
    assert server.request_headers[0]["authorization"] == f"Bearer {SECRET_KEY}"


def test_unset_key_env_sends_placeholder(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(KEY_ENV)
    caplog.set_level(logging.DEBUG, logger="rlpa_jax.dialogue.llm.client")
    with OpenAIServer(scripted("fine")) as server:
        assert call(make_client(server), user("hi")) == "fine"
    assert server.request_headers[0]["authorization"] == "Bearer EMPTY"
    assert KEY_ENV in caplog.text and "placeholder" in caplog.text


def test_invalid_config_names_the_fields() -> None:
    with pytest.raises(ValueError, match=r"max_concurrency=0 must be >= 1.*timeout_s=0 must be > 0"):
        LLMConfig(base_url="http://127.0.0.1:1/v1", model="m", max_concurrency=0, timeout_s=0)
    with pytest.raises(ValueError, match="base_url='localhost:8000' must start with http"):
        LLMConfig(base_url="localhost:8000", model="m")


def test_bad_messages_are_rejected_before_any_request() -> None:
    with OpenAIServer(scripted("never")) as server:
        client = make_client(server)
        with pytest.raises(ValueError, match=r"messages\[1\]"):
            call(client, [{"role": "user", "content": "a"}, {"content": "no role"}])
        with pytest.raises(ValueError, match="non-empty"):
            call(client, [])
    assert server.requests == []


# --- concurrency ------------------------------------------------------------------


def test_concurrency_is_bounded_and_results_keep_batch_order() -> None:
    jitter = random.Random(0)
    arrivals = itertools.count()
    # The first 4 requests are held until all 4 are in, so the limit is reached however slowly a
    # loaded machine sends them (60 s: a hang guard, waited out only by a client sending fewer).
    first_four = threading.Barrier(4, timeout=60)

    def slow_echo(request: dict) -> Reply:
        if next(arrivals) < 4:
            first_four.wait()
        # Uneven delays make completion order differ from submission order.
        return Reply(content=last_user_text(request).upper(), hang_s=0.05 + 0.1 * jitter.random())

    with OpenAIServer(slow_echo) as server:
        client = make_client(server, max_concurrency=4)

        async def run_batch() -> list:
            try:
                return await client.complete_many([user(f"item {i}") for i in range(16)])
            finally:
                await client.aclose()

        results = asyncio.run(run_batch())
    assert results == [f"ITEM {i}" for i in range(16)]
    assert len(server.requests) == 16
    assert server.max_in_flight == 4  # never more than the limit, and the limit was actually used
    assert client.usage.calls == 16 and client.usage.requests == 16


def test_complete_many_returns_errors_in_place() -> None:
    def handler(request: dict) -> Reply:
        text = last_user_text(request)
        return Reply(status=400, error_message="bad prompt") if "bad" in text else Reply(content=text)

    with OpenAIServer(handler) as server:
        client = make_client(server)
        results = run_sync(client.complete_many([user("good 1"), user("bad"), user("good 2")]))
    assert results[0] == "good 1" and results[2] == "good 2"
    assert isinstance(results[1], LLMCallError) and results[1].status == "HTTP 400"
    assert client.usage.failures == 1 and client.usage.calls == 3


# --- retries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "first_reply, status",
    [
        (Reply(status=429), "HTTP 429"),
        (Reply(status=500), "HTTP 500"),
        (Reply(status=503), "HTTP 503"),
        (Reply(malformed=True), "malformed response"),
        (Reply(content=None), "malformed response"),
    ],
    ids=["429", "500", "503", "non-json-body", "null-content"],
)
def test_retryable_failure_then_success(first_reply: Reply, status: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rlpa_jax.dialogue.llm.client")
    with OpenAIServer(scripted(first_reply, Reply(content="recovered"))) as server:
        client = make_client(server)
        assert call(client, user("hi")) == "recovered"
    assert len(server.requests) == 2
    assert client.usage.retries == 1 and client.usage.failures == 0 and client.usage.requests == 2
    assert status in caplog.text  # the retry is logged with its reason


def test_hang_past_timeout_is_abandoned_then_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rlpa_jax.dialogue.llm.client")
    with OpenAIServer(scripted(Reply(hang_s=HANG_S), Reply(content="on time"))) as server:
        client = make_client(server, timeout_s=1.0, max_retries=2)
        started = time.monotonic()
        assert call(client, user("hi")) == "on time"
        elapsed_s = time.monotonic() - started
    assert elapsed_s >= 1.0  # the first attempt ran its whole timeout
    assert "timeout: no answer within 1s; retry 1/2" in caplog.text
    assert client.usage.retries == 1 and len(server.requests) == 2
    # The retry reached the server while it still held the first request: abandoned, not waited out.
    assert server.max_in_flight == 2


def test_every_attempt_hanging_raises_after_timeouts() -> None:
    with OpenAIServer(scripted(Reply(hang_s=HANG_S))) as server:
        client = make_client(server, timeout_s=1.0, max_retries=1)
        error = call_error(client, user("hi"))
        # Both requests are still held by the server: the client gave up on them, it did not wait.
        still_held = server.in_flight
    assert error.status == "timeout" and len(error.attempts) == 2
    assert all(attempt.startswith("timeout") for attempt in error.attempts)
    assert len(server.requests) == 2 and still_held == 2


def test_client_error_fails_at_once_without_retry() -> None:
    with OpenAIServer(scripted(Reply(status=400, error_message="unknown field 'foo'"), "never sent")) as server:
        client = make_client(server, max_retries=4)
        error = call_error(client, user("hi"))
    assert len(server.requests) == 1
    assert client.usage.retries == 0 and client.usage.failures == 1
    assert error.status == "HTTP 400" and len(error.attempts) == 1
    assert "not retryable" in str(error) and "unknown field 'foo'" in str(error)


def test_exhausted_retries_list_every_attempt() -> None:
    script = scripted(Reply(status=500), Reply(status=429), Reply(malformed=True), Reply(status=502))
    with OpenAIServer(script) as server:
        client = make_client(server, max_retries=3)
        error = call_error(client, user("hi"))
    message = str(error)
    assert len(server.requests) == 4
    assert error.attempts[0].startswith("HTTP 500")
    assert error.attempts[1].startswith("HTTP 429")
    assert error.attempts[2].startswith("malformed response")
    assert error.attempts[3].startswith("HTTP 502")
    assert error.status == "HTTP 502" and error.model == "test-model" and error.base_url == server.base_url
    for expected in ("'test-model'", server.base_url, "HTTP 502", "4 of at most 4 attempt(s)", "retries exhausted"):
        assert expected in message
    assert client.usage.retries == 3 and client.usage.failures == 1 and client.usage.requests == 4


def test_retry_after_header_is_honoured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rlpa_jax.dialogue.llm.client")
    with OpenAIServer(scripted(Reply(status=429, retry_after_s=0.4), "after wait")) as server:
        client = make_client(server, backoff_max_s=5.0)
        assert call(client, user("hi")) == "after wait"
    assert re.search(r"retry-after 0\.4s\); retry 1/\d+ in 0\.400s", caplog.text)  # not the jitter's <= 0.01 s
    refused, retried = server.arrivals
    assert retried - refused >= 0.4  # the server saw no retry before the moment it named


def test_retry_after_is_capped_by_backoff_max(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rlpa_jax.dialogue.llm.client")
    with OpenAIServer(scripted(Reply(status=503, retry_after_s=60), "soon")) as server:
        client = make_client(server, backoff_max_s=0.1)
        assert call(client, user("hi")) == "soon"
    assert re.search(r"retry-after 60s\); retry 1/\d+ in 0\.100s", caplog.text)  # backoff_max_s, not the 60 s
    refused, retried = server.arrivals
    assert retried - refused >= 0.1


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(1)
    for retry_index, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (6, 20.0)]:
        delays = [backoff_delay_s(retry_index, 0.5, 20.0, None, rng) for _ in range(300)]
        assert 0.0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling  # spread over [0, ceiling]
    assert backoff_delay_s(0, 0.5, 20.0, 3.0, rng) == 3.0
    assert backoff_delay_s(0, 0.5, 20.0, 90.0, rng) == 20.0


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after_s({"retry-after": "2"}) == 2.0
    assert parse_retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after_s({}) is None
    assert parse_retry_after_s({"retry-after": "soon-ish"}) is None
    before = time.time()
    moment = math.floor(before + 30)  # an HTTP date says whole seconds
    waited = parse_retry_after_s({"retry-after": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(moment))})
    assert moment - time.time() <= waited <= moment - before  # counted from the moment it was parsed


# --- cache ------------------------------------------------------------------------


def test_cache_hits_skip_http_and_survive_a_new_client(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache" / "llm.jsonl"
    counter = iter(range(1000))
    with OpenAIServer(lambda request: f"answer {next(counter)}") as server:
        first = make_client(server, cache_path=str(cache_path))
        assert call(first, user("q")) == "answer 0"
        assert call(first, user("q")) == "answer 0"
        assert len(server.requests) == 1
        assert call(first, user("q"), temperature=0.7) == "answer 1"
        assert call(first, user("q"), json_mode=True) == "answer 2"
        assert call(first, user("q"), max_tokens=9) == "answer 3"
        assert len(server.requests) == 4
        assert first.usage.cache_hits == 1 and first.usage.calls == 5

        second = make_client(server, cache_path=str(cache_path))
        assert call(second, user("q")) == "answer 0"
        assert call(second, user("q"), temperature=0.7) == "answer 1"
        assert len(server.requests) == 4
        assert second.usage.cache_hits == 2 and second.usage.requests == 0

        other_model = make_client(server, cache_path=str(cache_path), model="other-model")
        assert call(other_model, user("q")) == "answer 4"
        base_url = server.base_url

    # Another server with the same model name does not get this server's answers.
    with OpenAIServer(lambda request: "from the other server") as other_server:
        elsewhere = make_client(other_server, cache_path=str(cache_path))
        assert call(elsewhere, user("q")) == "from the other server" and len(other_server.requests) == 1

    lines = [json.loads(line) for line in cache_path.read_text().splitlines()]
    assert [sorted(line) for line in lines] == [["content", "key"]] * 6
    assert lines[0] == {"key": cache_key(base_url, "test-model", user("q"), 0.0, 512, False), "content": "answer 0"}


def test_failures_are_not_cached(tmp_path: Path) -> None:
    cache_path = tmp_path / "llm.jsonl"
    with OpenAIServer(scripted(Reply(status=400), "works now")) as server:
        client = make_client(server, cache_path=str(cache_path))
        call_error(client, user("q"))
        assert not cache_path.exists()
        assert call(client, user("q")) == "works now"
    assert len(server.requests) == 2


def test_identical_concurrent_calls_share_one_request(tmp_path: Path) -> None:
    with OpenAIServer(scripted(Reply(content="shared", hang_s=0.1))) as server:
        client = make_client(server, cache_path=str(tmp_path / "llm.jsonl"))
        results = run_sync(client.complete_many([user("same")] * 6 + [user("other")]))
    assert results == ["shared"] * 7
    assert len(server.requests) == 2
    assert client.usage.cache_hits == 5 and client.usage.calls == 7
    assert len((tmp_path / "llm.jsonl").read_text().splitlines()) == 2


def test_corrupt_cache_lines_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_path = tmp_path / "llm.jsonl"
    caplog.set_level(logging.WARNING, logger="rlpa_jax.dialogue.llm.client")
    with OpenAIServer(scripted("fresh")) as server:
        good = {"key": cache_key(server.base_url, "test-model", user("cached"), 0.0, 512, False), "content": "from disk"}
        # Line 2 is garbage, line 3 has the wrong shape, and the file ends in a torn write.
        cache_path.write_text(json.dumps(good) + "\n{not json\n[1, 2]\n" + '{"key": "torn', encoding="utf-8")
        client = make_client(server, cache_path=str(cache_path))
        assert call(client, user("cached")) == "from disk"
        assert call(client, user("new")) == "fresh"
        base_url = server.base_url
    assert len(server.requests) == 1
    warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert [f"{cache_path}:{line}" in message for message, line in zip(warned, (2, 3, 4))] == [True] * 3
    # The new entry starts on its own line, so the file stays readable after a torn write.
    last_line = json.loads(cache_path.read_text().splitlines()[-1])
    assert last_line["content"] == "fresh"
    with OpenAIServer(scripted("not from the cache")) as server:
        # The same endpoint (the cache key names it) reads the appended line back.
        assert call(make_client(server, cache_path=str(cache_path), base_url=base_url), user("new")) == "fresh"
    assert server.requests == []


def test_the_cache_gives_every_answer_back_after_reopening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers come back from the file, not from memory: across a reopen, after the index merges
    the answers put since opening (a small RECENT_LIMIT forces merges), for a key written twice
    (the later line wins), for answers longer than one read, and for line separators inside an
    answer that are not newlines (U+2028, U+0085)."""
    monkeypatch.setattr(response_cache, "RECENT_LIMIT", 7)
    path = tmp_path / "llm.jsonl"
    answers = {f"key {index}": f"answer {index} " * (index % 5) for index in range(40)}
    answers |= {"long": "x" * 10_000 + "end", "separators": "one\u2028two\x85three\rfour", "empty": ""}
    cache = ResponseCache(path, process=0, processes=1)
    for key, content in answers.items():
        cache.put(key, content)
    cache.put("key 3", "a newer answer")
    answers["key 3"] = "a newer answer"
    cache.put("key 4", answers["key 4"])  # the same answer again: no new line
    assert len(path.read_text(encoding="utf-8").split("\n")) == len(answers) + 2  # + the rewrite, + the last ""
    assert {key: cache.get(key) for key in answers} == answers and len(cache) == len(answers)

    reopened = ResponseCache(path, process=0, processes=1)
    assert {key: reopened.get(key) for key in answers} == answers and len(reopened) == len(answers)
    assert reopened.get("never put") is None
    reopened.put("after reopening", "appended")
    assert ResponseCache(path, process=0, processes=1).get("after reopening") == "appended"


def test_keys_sharing_a_fingerprint_miss_instead_of_answering_wrongly(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(response_cache, "fingerprint", lambda key: 42)  # every key collides
    path = tmp_path / "llm.jsonl"
    cache = ResponseCache(path, process=0, processes=1)
    cache.put("a", "answer a")
    cache.put("b", "answer b")  # takes the shared slot
    assert (cache.get("a"), cache.get("b")) == (None, "answer b")
    reopened = ResponseCache(path, process=0, processes=1)
    assert (reopened.get("a"), reopened.get("b")) == (None, "answer b")  # the later line holds the slot


def held_by_opening(path: Path) -> tuple[ResponseCache, int, int]:
    """(the cache, the bytes of Python allocations it holds, the allocation peak while opening)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = ResponseCache(path, process=0, processes=1)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return cache, held - before, peak - before


def test_an_open_cache_holds_no_answer_text(tmp_path: Path) -> None:
    """What the open cache holds depends on the number of answers, not on their size, and opening
    never holds the file whole: 2,000 answers of 8 bytes and of 8 KB (16 MB of text)."""
    entries = 2000
    sizes = {"small": 8, "large": 8192}
    for name, size in sizes.items():
        with (tmp_path / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for index in range(entries):
                handle.write(json.dumps({"key": f"{index:064x}", "content": f"{index:08d}" * (size // 8)}) + "\n")
    small, small_held, _ = held_by_opening(tmp_path / "small.jsonl")
    large, large_held, large_peak = held_by_opening(tmp_path / "large.jsonl")
    large_file_bytes = (tmp_path / "large.jsonl").stat().st_size
    assert len(small) == len(large) == entries
    assert large_held <= small_held + 4096  # the same index whatever the answers' size
    assert large_held < entries * 64  # 16 bytes per answer, the arrays' headers aside
    assert large_peak < large_file_bytes / 20  # one line at a time
    assert large.get(f"{1234:064x}") == f"{1234:08d}" * 1024


# --- key hygiene and usage --------------------------------------------------------


def test_api_key_never_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cache_path = tmp_path / "llm.jsonl"
    # A server that echoes the key back in its error message must not carry it into our errors.
    script = scripted("cached answer", Reply(status=500), Reply(status=401, error_message=f"bad key {SECRET_KEY}"))
    with OpenAIServer(script) as server:
        client = make_client(server, cache_path=str(cache_path))
        call(client, user("a"))
        error = call_error(client, user("b"))
    assert server.request_headers[0]["authorization"] == f"Bearer {SECRET_KEY}"  # the key was really used
    assert error.status == "HTTP 401" and "bad key ***" in str(error)
    texts = [cache_path.read_text(), repr(client), str(client), str(client.config), str(error),
             repr(error.attempts), caplog.text, json.dumps(client.usage.summary())]
    assert all(SECRET_KEY not in text for text in texts)


def test_usage_counts_tokens_latency_and_cost_from_responses(tmp_path: Path) -> None:
    script = scripted(Reply(content="x", prompt_tokens=11, completion_tokens=5, hang_s=0.05))
    with OpenAIServer(script) as server:
        client = make_client(server, cache_path=str(tmp_path / "llm.jsonl"),
                             price_input_per_mtok=2.0, price_output_per_mtok=10.0)
        call(client, user("one"))
        call(client, user("two"))
        call(client, user("one"))
    assert client.usage.summary() == {
        "calls": 3, "cache_hits": 1, "prompt_tokens": 22, "completion_tokens": 10,
        "retries": 0, "failures": 0, "requests": 2, "rate_limited": 0, "wait_s": 0.0,
    }
    assert client.usage.summary(prefix="judge/")["judge/calls"] == 3
    assert len(client.usage.latencies_s) == 2 and min(client.usage.latencies_s) >= 0.05  # the server's delay
    assert client.prices.cost(client.usage) == pytest.approx((22 * 2.0 + 10 * 10.0) / 1e6)


# --- sync use ---------------------------------------------------------------------


def test_run_sync_reuses_one_client_across_loops_and_inside_a_running_loop() -> None:
    with OpenAIServer(lambda request: last_user_text(request)[::-1]) as server:
        client = make_client(server)
        assert run_sync(client.complete(user("abc"))) == "cba"
        assert run_sync(client.complete(user("xyz"))) == "zyx"  # a second loop, same client

        async def from_inside_a_loop() -> str:
            return run_sync(client.complete(user("loop")))

        assert asyncio.run(from_inside_a_loop()) == "pool"
        # Each finished loop closed its own connections (no leak, no late close on a dead loop).
        assert client._state is not None and client._state.sdk.is_closed()
    assert len(server.requests) == 3
