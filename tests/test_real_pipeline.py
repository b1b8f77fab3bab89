"""One PPO iteration with the real Qwen2.5-Coder-0.5B-Instruct playing the simulated user and both
judges (backend local, the paper's prompts), the policy the tiny random model: the CI-sized run of
the real path (issue 22). Short lengths keep it to a few minutes on 2 CPU cores.

A random policy writes no well-formed turns, and malformed turns never reach the judges; a short
SFT on the scripted dialogues teaches the tiny policy the <profile>/<response> format first, so
the judges get real samples to read. The model comes from the same cache as tests/test_real_model.py
(fetched there, or by `make real-model`); without it every test here skips, naming why.
"""

from __future__ import annotations

import json

import pytest

from rlpa_jax.app import fetch
from rlpa_jax.app.build import build_trainer
from rlpa_jax.config.loading import load_config
from rlpa_jax.dialogue.llm import local

ROLES = ("user", "profile_judge", "response_judge")
TINY = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "data.num_personas=16", "mesh.devices=1", "logging.progress_bar=false", "logging.tensorboard=false",
    # One conversation, one turn, two samples: the judges read two replies (~1,400-token prompts each).
    "rollout.conversations=1", "rollout.max_rounds=1", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=96",
    "rollout.system_prompt=policy_system_tiny", "rollout.pipeline_groups=1",
    "rollout.prompt_buckets=[64,128,256]", "rollout.max_prompt_tokens=256", "rollout.eval_conversations=1",
    "ppo.iterations=1", "ppo.train_batch_size=4", "ppo.micro_batch_size=4",
    # Enough SFT for the tiny policy to write the turn format most of the time (seconds on CPU).
    "sft.enabled=true", "sft.steps=200", "sft.batch_size=8", "sft.num_dialogues=32",
]


@pytest.fixture(scope="module")
def model_dir():
    try:
        return fetch.fetch_model()
    except fetch.FetchError as error:
        pytest.skip(f"real model not fetched: {error}")


@pytest.fixture(scope="module")
def real_run(model_dir, tmp_path_factory):
    """One iteration with every role on the real folder; the folder's loads counted from a fresh registry."""
    loads = []
    original = local.ChatModel.from_hf.__func__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local, "_MODELS", {})
        patch.setattr(local.ChatModel, "from_hf",
                      classmethod(lambda cls, path, **options: loads.append(path) or original(cls, path, **options)))
        config = load_config(None, TINY + [
            f"output_dir={tmp_path_factory.mktemp('real')}", "user.kind=llm", "user.prompt=paper_user",
            "judges.kind=llm", "judges.profile_prompt=paper_profile_judge",
            "judges.response_prompt=paper_response_judge",
            "llm.backend=local", f"llm.checkpoint={model_dir}", "llm.temperature=0.0",
            "user.llm.max_tokens=48", "judges.llm.max_tokens=96"])
        trainer = build_trainer(config)
        summary = trainer.train()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, summary, records, loads


def test_one_ppo_iteration_with_a_real_user_and_real_judges(real_run, model_dir):
    trainer, _, records, loads = real_run
    assert [r["phase"] for r in records if r["phase"] != "sft"] == ["eval_start", "ppo", "eval_end"]
    [ppo] = [r for r in records if r["phase"] == "ppo"]
    assert ppo["samples"] == 2 and ppo["user_failures"] == 0
    # Usage is logged for every role. The real model wrote the user's messages and judged the
    # replies; the profile judge is asked only about non-empty profiles, and at the first turn
    # (the user said only "Hello") the policy lists nothing: its calls are counted, maybe none.
    for role in ROLES:
        assert {f"llm/{role}/{k}" for k in ("calls", "prompt_tokens", "completion_tokens", "p50_s")} <= ppo.keys()
        assert ppo[f"llm/{role}/failures"] == 0, role
    for role in ("user", "response_judge"):
        assert ppo[f"llm/{role}/calls"] >= 1, role
        assert ppo[f"llm/{role}/prompt_tokens"] > 0 and ppo[f"llm/{role}/completion_tokens"] > 0, role
        assert ppo[f"llm/{role}/p50_s"] > 0, role
    # Three roles (and the evaluation's judge) on one folder: one load, one engine.
    assert loads == [model_dir.resolve()]
    engines = {id(client._local.model.chat.engine) for client in trainer.parts.environment.llm_clients().values()}
    assert len(engines) == 1


def test_the_real_judges_verdicts_parse(real_run):
    """A 0.5B model does not always end with a \\boxed{} verdict: unparsable answers are re-asked,
    and samples still without one are left unscored. Most of its first answers must parse."""
    trainer, _, _, _ = real_run
    environment = trainer.parts.environment
    for judge in (environment.profile_judge, environment.response_judge):
        stats = judge.stats
        share = 1 - stats.unparsable / stats.requests if stats.requests else float("nan")
        print(f"{type(judge).__name__}: {stats.requests} requests, {share:.0%} parsed, {stats.failed} unscored")
    stats = environment.response_judge.stats
    # Some verdicts must parse (a parser that never reads the real model's \boxed{} fails here);
    # the share a 0.5B judge reaches in 96 tokens is measured, not promised (docs/RESULTS.md).
    assert stats.requests > stats.unparsable, (stats, environment.response_judge.last_problem)
