"""The rollout at endpoint load, scaled down for CI (benchmarks/endpoint_load.py is the full run).

Everything of the paper-scale benchmark shrinks by the same factor: "a minute" is a 5 s window,
the server's 0.5-2 s answers take 5/60 of that, and 100 requests per window stand for the RPM
budget. A rollout of 16 conversations x 4 samples x 2 turns (288 calls by the user and both
judges, all on one endpoint) must keep within the limit as the server counts it, with no 429,
and be scored exactly as against an unlimited instant server. How much of the budget it uses is
a speed, which a loaded CI machine's scheduling delays move: benchmarks/endpoint_load.py measures
it at full scale (>= 90 % required; 97.7-98.5 %, docs/PERF.md).
"""

import sys
from pathlib import Path

import pytest
from tiny_corpus import synthetic_corpus

from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.dialogue.judges.llm import LLMProfileJudge, LLMResponseJudge
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.users.llm import LLMUser
from rlpa_jax.model.tokenizer import load_tokenizer, train_tiny_tokenizer
from rlpa_jax.rl.environment import Environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from endpoint_load import run_load  # noqa: E402

WINDOW_S, LIMIT = 5.0, 100
LATENCY_S = (0.5 * WINDOW_S / 60, 2.0 * WINDOW_S / 60)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512))


def test_a_rollout_keeps_within_the_rpm_and_scores_every_sample(tokenizer):
    def environment(base_url: str, limit: int | None) -> Environment:
        def client() -> LLMClient:  # a client per role, one endpoint: the roles share its limiter
            # timeout_s: a hang guard (the server answers in at most 2/12 s)
            return LLMClient(LLMConfig(base_url=base_url, model="gpt-4o-mini", rpm=limit, limit_window_s=WINDOW_S,
                                       max_concurrency=32, max_retries=6, backoff_max_s=WINDOW_S, timeout_s=60.0))

        return Environment(tokenizer, load_prompt("policy_system"), LLMUser(client()), LLMProfileJudge(client()),
                           LLMResponseJudge(client()), max_prompt_tokens=2048)

    result = run_load(environment, LIMIT, WINDOW_S, LATENCY_S, conversations=16, samples=4, rounds=2, groups=2)
    report = "\n".join(result.lines(LIMIT, WINDOW_S))
    assert result.samples == 16 * 4 * 2, report
    assert result.requests >= 16 * 4 * 2 * 2 + 16, report  # both judges on every sample, the user on every turn
    assert result.peak_in_window <= LIMIT and result.rejected == 0, report
    assert result.mis_scored == 0, report
    assert result.llm["llm/response_judge/calls"] == 16 * 4 * 2 and result.llm["llm/response_judge/p90_s"] > 0, report
