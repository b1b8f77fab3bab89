"""What the LLM roles cost and how their endpoints behaved: per-client counters, and per-role
metrics over an interval (a PPO iteration, an evaluation) for metrics.jsonl, TensorBoard, the
progress bar and run summaries.

Each role (user, profile_judge, response_judge, eval_judge) has its own client, so its counters
are its own even when roles share an endpoint (and its rate limit).
"""

from __future__ import annotations

import array
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens, as providers quote them


@dataclass
class LLMUsage:
    """Running counters over a client's life.

    calls: complete() calls; cache_hits: calls answered without their own HTTP request
    (cache or an identical request in flight); requests: HTTP attempts made; retries: attempts
    after the first; failures: calls that raised LLMCallError; rate_limited: attempts answered
    429; latencies_s: seconds of every answered request (limiter wait excluded; 8 bytes each, a
    run's whole-run percentiles need them all: 2.7 MB per episode of the paper's 340k calls);
    wait_s: seconds spent waiting for the endpoint's rate limiter.
    """

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0
    requests: int = 0
    rate_limited: int = 0
    wait_s: float = 0.0
    latencies_s: Sequence[float] = field(default_factory=lambda: array.array("d"))

    def summary(self, prefix: str = "") -> dict[str, int | float]:
        """Counters as a flat dict for metrics logs, keys optionally prefixed (e.g. "judge_llm/")."""
        counters = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "latencies_s"}
        return {prefix + name: value for name, value in counters.items()}

    def mark(self) -> "UsageMark":
        """The counters now and how many latencies there are: the latencies only grow, so a mark
        needs no copy of them (a meter marks every PPO iteration)."""
        return UsageMark(dataclasses.replace(self, latencies_s=[]), len(self.latencies_s))


@dataclass(frozen=True)
class UsageMark:
    """A client's usage at one moment: its counters, and the number of latencies recorded so far."""

    counters: LLMUsage
    latency_count: int


def usage_since(usage: LLMUsage, before: UsageMark, until: UsageMark | None = None) -> LLMUsage:
    """What happened to one client's `usage` between two of its marks (`until` None: now)."""
    until = until or usage.mark()
    deltas = {f.name: getattr(until.counters, f.name) - getattr(before.counters, f.name)
              for f in dataclasses.fields(LLMUsage) if f.name != "latencies_s"}
    return LLMUsage(**deltas, latencies_s=usage.latencies_s[before.latency_count:until.latency_count])


@dataclass(frozen=True)
class Prices:
    """US dollars per million prompt (input) and completion (output) tokens; None: not priced."""

    input_per_mtok: float | None = None
    output_per_mtok: float | None = None

    def cost(self, usage: LLMUsage) -> float:
        return ((self.input_per_mtok or 0.0) * usage.prompt_tokens
                + (self.output_per_mtok or 0.0) * usage.completion_tokens) / TOKENS_PER_PRICE_UNIT


def role_metrics(role: str, usage: LLMUsage, prices: Prices) -> dict[str, float]:
    """`llm/<role>/<name>` metrics of one interval's usage: calls, requests, retries, failures,
    rate_limited, cache hits and rate, p50/p90/p99 latency, tokens, cost and limiter wait."""
    metrics = {
        "calls": usage.calls, "requests": usage.requests, "retries": usage.retries, "failures": usage.failures,
        "rate_limited": usage.rate_limited, "cache_hits": usage.cache_hits,
        "cache_hit_rate": usage.cache_hits / usage.calls if usage.calls else 0.0,
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "cost_usd": prices.cost(usage), "wait_s": usage.wait_s,
    }
    latencies = np.asarray(usage.latencies_s, np.float64)
    for percentile in PERCENTILES:
        metrics[f"p{percentile}_s"] = float(np.percentile(latencies, percentile)) if latencies.size else 0.0
    return {f"llm/{role}/{name}": float(value) for name, value in metrics.items()}


class MeteredClient(Protocol):
    """What the meter reads of a client (LLMClient): its usage counters and its prices."""

    usage: LLMUsage
    prices: Prices


class LLMMeter:
    """Per-role LLM metrics for a run: `interval()` since the previous call or `mark()` (one PPO
    iteration's rollout), `totals()` since the meter was made."""

    def __init__(self, clients: Mapping[str, MeteredClient]) -> None:
        self.clients = dict(clients)
        self._start = {role: client.usage.mark() for role, client in self.clients.items()}
        self._mark = dict(self._start)

    def mark(self) -> None:
        """Start the next interval here (what happened since the last one is left out)."""
        self._mark = {role: client.usage.mark() for role, client in self.clients.items()}

    def interval(self) -> dict[str, float]:
        """Each role's metrics since the last interval() (or the start); starts the next interval."""
        metrics = {}
        for role, client in self.clients.items():
            now = client.usage.mark()
            metrics |= role_metrics(role, usage_since(client.usage, self._mark[role], now), client.prices)
            self._mark[role] = now
        return metrics

    def totals(self) -> dict[str, float]:
        metrics = {}
        for role, client in self.clients.items():
            metrics |= role_metrics(role, usage_since(client.usage, self._start[role]), client.prices)
        return metrics


def processes_metrics(every: Sequence[Mapping[str, float]]) -> dict:
    """Several processes' role metrics (role_metrics' keys, one record each, in process order) as
    one record: counts, tokens, cost and waits summed, cache hit rates recomputed from the sums,
    latency percentiles the largest of any process (an upper bound: the processes' latencies are
    not pooled), and each process's own record under "per_process"."""
    combined: dict = {}
    for key in every[0]:
        values = [record.get(key, 0.0) for record in every]
        percentile = any(key.endswith(f"/p{p}_s") for p in PERCENTILES)
        combined[key] = max(values) if percentile else sum(values)
    for key in [k for k in combined if k.endswith("/cache_hit_rate")]:
        calls = combined[key.removesuffix("cache_hit_rate") + "calls"]
        combined[key] = combined[key.removesuffix("cache_hit_rate") + "cache_hits"] / calls if calls else 0.0
    return combined | {"per_process": [dict(record) for record in every]}


def progress_postfix(metrics: Mapping[str, float], roles: Sequence[str]) -> str:
    """One short line for the progress bar from role metrics: calls, the slowest role's p90,
    failures, 429s and cost, e.g. '576 calls p90 1.8s 0 fail 0 429 $0.041'."""
    def total(name: str) -> float:
        return sum(metrics.get(f"llm/{role}/{name}", 0.0) for role in roles)

    p90 = max((metrics.get(f"llm/{role}/p90_s", 0.0) for role in roles), default=0.0)
    return (f"{total('calls'):.0f} calls p90 {p90:.1f}s {total('failures'):.0f} fail "
            f"{total('rate_limited'):.0f} 429 ${total('cost_usd'):.3f}")
