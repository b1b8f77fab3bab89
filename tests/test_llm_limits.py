"""Requests and tokens per minute against a real 127.0.0.1 server that counts what it receives.

"Per minute" is shrunk to a window of a second or two (`limit_window_s`) so each test runs in
seconds; the server (tests/openai_server.py) enforces the same window with 429s and reports the
most requests (and tokens) it saw in any window.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np
import pytest
from openai_server import OpenAIServer, RateLimit, Reply, peak_in_window, scripted

from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.llm.limiter import RateLimiter, RateLimits, estimate_tokens
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.dialogue.llm.usage import LLMMeter, LLMUsage, Prices, processes_metrics, progress_postfix, role_metrics
from rlpa_jax.runtime import multihost

FAST = dict(backoff_initial_s=0.01, backoff_max_s=5.0, timeout_s=60.0)  # timeout_s: a hang guard


def make_client(server: OpenAIServer, model: str = "m", **overrides: object) -> LLMClient:
    return LLMClient(LLMConfig(base_url=server.base_url, model=model, api_key_env="RLPA_TEST_UNSET_KEY",
                               **(FAST | overrides)))


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def many(clients_and_texts: list[tuple[LLMClient, str]], **kw: object) -> list[str]:
    try:
        return list(await asyncio.gather(*(client.complete(ask(text), **kw) for client, text in clients_and_texts)))
    finally:
        for client in {id(c): c for c, _ in clients_and_texts}.values():
            await client.aclose()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the loop would wait: a sleep ends at once and adds
    its length to the clock. Code timed by this loop's clock runs as on an idle machine, however
    loaded this one is, so its schedule can be asserted exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        poll = self._selector.select

        def advance_then_poll(timeout: float | None = None):
            if timeout is None:  # nothing scheduled: only I/O can wake the loop
                return poll(None)
            self.now += timeout
            return poll(0)

        self._selector.select = advance_then_poll

    def time(self) -> float:
        return self.now


def test_rpm_paces_requests_within_the_servers_window():
    window_s, limit, calls = 1.0, 20, 50
    with OpenAIServer(lambda request: "ok", rate_limit=RateLimit(limit, window_s)) as server:
        client = make_client(server, rpm=limit, limit_window_s=window_s, max_concurrency=64)
        assert asyncio.run(many([(client, f"q{i}") for i in range(calls)])) == ["ok"] * calls
    # Paced by our limiter, not throttled by the server into retries.
    assert server.rejected == 0 and client.usage.rate_limited == 0 and client.usage.retries == 0
    assert peak_in_window(server.arrivals, window_s) <= limit
    assert client.usage.wait_s > 0


def test_paced_requests_start_on_their_slots_at_full_speed():
    """The limiter wastes no time: on a clock that moves only while it waits, 50 requests for a
    budget of 20 a second start 1/20 s apart, and each also waits for the request 20 before it to
    leave the window, one window after its answer (10 ms after its start): 10 ms more per window."""
    window_s, limit, calls, answer_s = 1.0, 20, 50, 0.01
    loop = VirtualClockLoop()
    limiter = RateLimiter(RateLimits(rpm=limit, window_s=window_s), clock=loop.time)
    starts = []

    async def request() -> None:
        await limiter.acquire(1)
        starts.append(loop.time())
        await asyncio.sleep(answer_s)
        limiter.release(1, 1)

    async def all_requests() -> None:
        await asyncio.gather(*(request() for _ in range(calls)))

    try:
        loop.run_until_complete(all_requests())
    finally:
        loop.close()
    interval = window_s / limit
    assert starts == pytest.approx([i * interval + (i // limit) * answer_s for i in range(calls)])


def test_without_the_limiter_the_same_load_is_refused():
    """The server really enforces the limit: unpaced, the same calls meet 429s (then retry). A
    long window, so a loaded machine that sends the 15 requests slowly still overruns it."""
    window_s, limit = 30.0, 5
    with OpenAIServer(lambda request: "ok", rate_limit=RateLimit(limit, window_s)) as server:
        client = make_client(server, max_concurrency=64, max_retries=0)

        async def unpaced():
            try:
                return await client.complete_many([ask(f"q{i}") for i in range(15)])
            finally:
                await client.aclose()

        asyncio.run(unpaced())
    assert server.rejected >= 15 - 2 * limit and client.usage.rate_limited == server.rejected


def test_every_client_of_an_endpoint_shares_one_budget():
    window_s, limit = 1.0, 20
    with OpenAIServer(lambda request: request["model"], rate_limit=RateLimit(limit, window_s)) as server:
        settings = dict(rpm=float(limit), limit_window_s=window_s)  # the config gives a float
        user = make_client(server, max_concurrency=8, **settings)
        judge = make_client(server, max_concurrency=32, **settings)
        other_model = make_client(server, model="other", **settings)
        assert user.limiter is judge.limiter and other_model.limiter is not user.limiter
        load = [(user, f"u{i}") for i in range(20)] + [(judge, f"j{i}") for i in range(20)]
        asyncio.run(many(load))
    assert server.rejected == 0 and peak_in_window(server.arrivals, window_s) <= limit


def test_tpm_settles_the_estimate_from_usage():
    """Each request is estimated at ~400 tokens (max_tokens) but uses 50: settled from the answer's
    usage, 10 requests one after another (4,050 tokens estimated, 500 used) all fit one 1000-token
    window and none waits; unsettled, the third would wait for the window (30 s) to free."""
    window_s, tpm, calls = 30.0, 1000, 10
    answer = Reply(content="ok", prompt_tokens=10, completion_tokens=40)
    with OpenAIServer(scripted(answer)) as server:
        client = make_client(server, tpm=tpm, limit_window_s=window_s, max_concurrency=1, max_tokens=400)
        assert estimate_tokens(ask("q0"), 400) >= 400
        asyncio.run(many([(client, f"q{i}") for i in range(calls)]))
    assert client.usage.wait_s == 0 and len(server.arrivals) == calls
    assert client.usage.prompt_tokens + client.usage.completion_tokens == calls * 50
    tokens_at = [t for t in server.arrivals for _ in range(50)]  # 50 tokens per request, at its arrival
    assert peak_in_window(tokens_at, window_s) <= tpm


@pytest.mark.parametrize("http_date", [False, True], ids=["seconds", "http-date"])
def test_retry_after_pauses_the_endpoint_for_every_client(http_date):
    """A 429 to one role pauses the endpoint: the other role's request, made during the pause,
    waits for its end too, and nothing is lost."""
    refusal = Reply(status=429, retry_after_s=1.0, retry_after_date=http_date)
    with OpenAIServer(scripted(refusal, "ok")) as server:
        user, judge = make_client(server, rpm=600), make_client(server, rpm=600)

        async def scenario():
            first = asyncio.ensure_future(user.complete(ask("a")))
            while user.limiter.pauses == 0:  # until the 429 has come back and paused the endpoint
                await asyncio.sleep(0.01)
            second = await judge.complete(ask("b"))
            return [await first, second]

        assert run_sync(scenario()) == ["ok"] * 2
    refused_at = server.arrivals[0]
    later = [t - refused_at for t in server.arrivals[1:]]
    assert len(later) == 2 and user.usage.rate_limited == 1 and user.limiter.pauses == 1
    # Retry-After said 1 s (an HTTP date: up to the next whole second): nothing came before, not
    # even the judge's request, made as soon as the pause began though the judge never saw a 429.
    assert min(later) >= 0.95, later
    assert judge.usage.rate_limited == 0 and judge.usage.retries == 0


def test_the_limiter_keeps_its_window_across_event_loops():
    """run_sync starts a new event loop per call; the limiter (no loop-bound state) keeps counting:
    three bursts of 6 in three loops meet one window of 8."""
    window_s, limit = 1.0, 8
    with OpenAIServer(lambda request: "ok", rate_limit=RateLimit(limit, window_s)) as server:
        client = make_client(server, rpm=limit, limit_window_s=window_s)
        started = time.monotonic()
        for round_ in range(3):
            async def burst(round_=round_):
                return await asyncio.gather(*(client.complete(ask(f"{round_}-{i}")) for i in range(6)))
            assert run_sync(burst()) == ["ok"] * 6
        elapsed = time.monotonic() - started
    assert server.rejected == 0 and peak_in_window(server.arrivals, window_s) <= limit
    assert elapsed >= (18 - limit) * window_s / limit  # paced across the loops, not reset by each


def test_a_waiter_cancelled_in_the_queue_never_sends():
    async def scenario():
        limiter = RateLimiter(RateLimits(rpm=2, window_s=1.0))
        await limiter.acquire(1)
        waiter = asyncio.ensure_future(limiter.acquire(1))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(scenario())


def test_processes_usage_sums_counts_and_keeps_the_slowest_percentile():
    """launch/eval.py over several processes writes their role metrics as one record."""
    first = role_metrics("user", LLMUsage(calls=3, requests=3, cache_hits=1, prompt_tokens=30,
                                          latencies_s=[0.1, 0.2, 0.3]), Prices())
    second = role_metrics("user", LLMUsage(calls=1, requests=1, failures=1, prompt_tokens=5, latencies_s=[2.0]),
                          Prices())
    combined = processes_metrics([first, second])
    assert (combined["llm/user/calls"], combined["llm/user/failures"], combined["llm/user/prompt_tokens"]) == (4, 1, 35)
    assert combined["llm/user/cache_hit_rate"] == pytest.approx(1 / 4)  # from the sums, not a sum of rates
    assert combined["llm/user/p50_s"] == pytest.approx(2.0)  # the slowest process's, an upper bound
    assert combined["per_process"] == [first, second]


def test_meter_reports_each_roles_interval_and_totals():
    with OpenAIServer(scripted(Reply(content="ok", prompt_tokens=100, completion_tokens=10, hang_s=0.02))) as server:
        user = make_client(server, price_input_per_mtok=1.0, price_output_per_mtok=4.0)
        judge = make_client(server, model="judge")
        meter = LLMMeter({"user": user, "response_judge": judge})
        started = time.monotonic()
        asyncio.run(many([(user, "a"), (user, "b"), (judge, "c")]))
        spanned_s = time.monotonic() - started
        first = meter.interval()
        asyncio.run(many([(judge, "d")]))
        second = meter.interval()
        totals = meter.totals()
    assert first["llm/user/calls"] == 2 and first["llm/response_judge/calls"] == 1
    assert first["llm/user/cost_usd"] == pytest.approx((200 * 1.0 + 20 * 4.0) / 1e6)
    assert first["llm/response_judge/cost_usd"] == 0.0  # no prices configured
    # Seconds of each request: at least the server's delay, at most the calls' whole span.
    assert 0.02 <= first["llm/user/p50_s"] <= first["llm/user/p90_s"] <= first["llm/user/p99_s"] <= spanned_s
    assert second["llm/user/calls"] == 0 and second["llm/response_judge/calls"] == 1
    assert totals["llm/response_judge/calls"] == 2 and totals["llm/user/prompt_tokens"] == 200
    line = progress_postfix(first, ["user", "response_judge"])
    assert line.startswith("3 calls p90 ") and "0 fail 0 429 $0.000" in line


@dataclass
class UsageOnly:
    """What the meter reads of a client (its MeteredClient protocol), without an endpoint."""

    usage: LLMUsage = field(default_factory=LLMUsage)
    prices: Prices = field(default_factory=Prices)


def test_the_meter_over_a_long_run_holds_8_bytes_per_latency_and_exact_percentiles():
    """The trainer marks the meter and reads an interval every iteration: 50 iterations of 2,000
    answered requests. The marks hold counts, not copies, and a latency takes 8 bytes (a list of
    floats and a copy per mark took 40), yet intervals and totals are the exact percentiles."""
    client = UsageOnly()
    meter = LLMMeter({"user": client})
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            meter.mark()
            latencies = rng.uniform(0.1, 3.0, 2000)
            for latency in latencies:
                client.usage.calls += 1
                client.usage.latencies_s.append(float(latency))
            interval = meter.interval()
            assert interval["llm/user/calls"] == 2000
            assert interval["llm/user/p90_s"] == pytest.approx(np.percentile(latencies, 90))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    every = np.random.default_rng(0).uniform(0.1, 3.0, (50, 2000)).ravel()  # the same draws again
    assert held < len(every) * 10  # 8 bytes per latency, the array's spare room aside
    totals = meter.totals()
    assert totals["llm/user/calls"] == len(every)
    assert totals["llm/user/p99_s"] == pytest.approx(np.percentile(every, 99))


def test_each_of_several_processes_keeps_an_equal_share_of_the_endpoints_limits(monkeypatch):
    assert RateLimits(rpm=600, tpm=90_000, window_s=2.0).share(3) == RateLimits(200, 30_000, 2.0)
    assert RateLimits(rpm=600).share(2) == RateLimits(rpm=300)
    with pytest.raises(ValueError, match="processes=0"):
        RateLimits(rpm=1).share(0)
    with OpenAIServer(lambda request: "ok") as server:
        alone = make_client(server, rpm=600, tpm=90_000)
        monkeypatch.setattr(multihost, "joined_processes", lambda: 4)
        one_of_four = make_client(server, model="m4", rpm=600, tpm=90_000)
    assert (alone.limiter.limits.rpm, alone.limiter.limits.tpm) == (600, 90_000)
    assert (one_of_four.limiter.limits.rpm, one_of_four.limiter.limits.tpm) == (150, 22_500)
