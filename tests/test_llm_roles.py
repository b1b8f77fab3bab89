"""Per-role LLM endpoints: the config sections and their inheritance, each role talking to its own
real 127.0.0.1 server, and the per-role metrics a training run logs (metrics.jsonl, TensorBoard,
the run summary)."""

import asyncio
import importlib.util
import json
import struct
from pathlib import Path

import pytest
from openai_server import OpenAIServer, Reply
from tensorboardX.proto import event_pb2

from rlpa_jax.app import build
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.options import ConfigError
from rlpa_jax.dialogue.chat import Message, format_turn, parse_turn
from rlpa_jax.dialogue.judges import ResponseRequest
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.dialogue.users import OPENING_MESSAGE
from rlpa_jax.rl import environment as environment_module

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout

SMALL = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "rollout.conversations=2", "rollout.max_rounds=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
    "rollout.prompt_buckets=[64,128,256]", "rollout.max_prompt_tokens=256",
    "ppo.train_batch_size=8", "ppo.micro_batch_size=4", "ppo.iterations=1", "sft.enabled=false",
    "logging.progress_bar=false", "logging.checkpoint_every=1", "logging.export_hf=false", "data.num_personas=16",
    "mesh.devices=1", "rollout.eval_conversations=2",
]


def answer_as_anyone(request: dict) -> Reply:
    """The start-up probe, the user (a system role-play prompt) or a judge (a \\boxed{} verdict)."""
    messages = request["messages"]
    if messages[-1]["content"] == "Reply with OK.":
        return Reply(content="OK")
    if messages[0]["role"] == "system":
        return Reply(content="I work as a nurse.", prompt_tokens=200, completion_tokens=8)
    return Reply(content="Judged. \\boxed{1}", prompt_tokens=300, completion_tokens=4)


# --- the config -------------------------------------------------------------------


def test_roles_inherit_field_by_field_from_the_shared_sections():
    config = load_config(None, ["user.kind=llm", "judges.kind=llm", "llm.base_url=http://127.0.0.1:9/v1",
                                "llm.rpm=600", "llm.price_input_per_mtok=0.15", "judges.llm.timeout_s=9",
                                "judges.response.llm.base_url=http://127.0.0.1:10/v1",
                                "judges.response.llm.model=strict-judge", "eval.judge.llm.model=gpt-4o",
                                "eval.judge.llm.rpm=100"])
    user, profile, response, judge = (config.user.llm, config.judges.profile.llm, config.judges.response.llm,
                                      config.eval.judge.llm)
    assert (user.base_url, user.model, user.rpm, user.timeout_s, user.price_input_per_mtok) == (
        "http://127.0.0.1:9/v1", "gpt-4o-mini", 600, 60.0, 0.15)
    assert (profile.base_url, profile.model, profile.timeout_s) == ("http://127.0.0.1:9/v1", "gpt-4o-mini", 9.0)
    assert (response.base_url, response.model, response.timeout_s, response.rpm) == (
        "http://127.0.0.1:10/v1", "strict-judge", 9.0, 600)
    assert (judge.base_url, judge.model, judge.timeout_s, judge.rpm) == ("http://127.0.0.1:9/v1", "gpt-4o", 9.0, 100)


def test_a_role_that_talks_to_an_llm_without_an_endpoint_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["user.kind=llm", "judges.kind=llm", "judges.profile.llm.base_url=http://127.0.0.1:9/v1"])
    lines = str(error.value).splitlines()
    assert any(line.strip().startswith("user.llm.base_url: user.kind=llm needs an LLM endpoint; set user.llm.base_url "
                                       "or llm.base_url") for line in lines), error.value
    assert any(line.strip().startswith("judges.response.llm.base_url: judges.kind=llm") for line in lines)
    assert not any("judges.profile.llm.base_url:" in line for line in lines)  # it has one
    load_config(None)  # the embedded default talks to no LLM and needs no endpoint


def test_roles_on_one_endpoint_must_agree_on_its_limits():
    with pytest.raises(ConfigError, match=r"roles on one endpoint \(gpt-4o-mini at http://127\.0\.0\.1:9/v1\) share "
                                          r"its rate limit.*judges\.response\.llm: rpm=100"):
        load_config(None, ["llm.base_url=http://127.0.0.1:9/v1", "llm.rpm=600", "judges.response.llm.rpm=100"])


def test_the_paper_configs_train_on_gpt_4o_mini_and_evaluate_with_gpt_4o():
    for name in ("qwen2.5-3b-8gpu.yaml", "qwen2.5-0.5b-1gpu.yaml"):
        config = load_config(REPO_ROOT / "configs" / name)
        training = [config.user.llm, config.judges.profile.llm, config.judges.response.llm]
        assert {section.model for section in training} == {"gpt-4o-mini"}, name
        assert config.eval.judge.llm.model == "gpt-4o", name
        assert all(s.rpm and s.tpm and s.price_input_per_mtok for s in [*training, config.eval.judge.llm]), name


# --- each role on its own server ----------------------------------------------------


def test_each_role_talks_to_its_own_endpoint(tmp_path):
    servers = {role: OpenAIServer(answer_as_anyone).start()
               for role in ("user", "profile_judge", "response_judge", "eval_judge")}
    try:
        config = build.load_config(None, [
            f"output_dir={tmp_path}", "user.kind=llm", "judges.kind=llm",
            f"llm.base_url={servers['user'].base_url}", "llm.max_retries=0",
            f"judges.llm.base_url={servers['profile_judge'].base_url}",  # the profile judge inherits it
            f"judges.response.llm.base_url={servers['response_judge'].base_url}",
            f"eval.judge.llm.base_url={servers['eval_judge'].base_url}", "eval.judge.llm.model=gpt-4o"])
        environment = build.build_environment(config, tokenizer=None)
        build.probe_endpoints(environment)
        _, eval_response_judge = build.build_eval_judges(config)
        [persona] = synthetic_personas(1, seed=0)
        state = environment.user_sim.start(persona, seed=0)
        history = [Message("user", OPENING_MESSAGE), Message("assistant", "Hi! What do you do?")]
        turn = parse_turn(format_turn([ProfileItem("Occupation", "nurse")], "Nice! Which ward?"))
        request = ResponseRequest(persona, tuple(history), turn.response)

        async def every_role():
            return (await environment.user_sim.respond([state], [history]),
                    await environment.profile_judge.count_matches([(turn.profile, persona.items)]),
                    await environment.response_judge.judge([request]),
                    await eval_response_judge.judge([request]))

        assert asyncio.run(every_role()) == (["I work as a nurse."], [1], [1], [1])
    finally:
        for server in servers.values():
            server.close()
    asked = {role: [r for r in server.requests if r["messages"][-1]["content"] != "Reply with OK."]
             for role, server in servers.items()}
    assert [r["messages"][0]["role"] for r in asked["user"]] == ["system"]
    assert "INFERRED_PROFILE" in asked["profile_judge"][0]["messages"][0]["content"]
    assert len(asked["profile_judge"]) == len(asked["response_judge"]) == len(asked["eval_judge"]) == 1
    assert [r["model"] for r in asked["eval_judge"]] == ["gpt-4o"]


# --- what a training run logs ------------------------------------------------------


def test_a_run_logs_each_roles_llm_metrics_every_iteration_and_totals_in_its_summary(tmp_path, monkeypatch):
    # An untrained policy rarely writes a well-formed turn, and only those go to the judges.
    turn = parse_turn(format_turn([ProfileItem("Occupation", "nurse")], "Nice! Which ward do you work on?"))
    monkeypatch.setattr(environment_module, "parse_turn", lambda text: turn)
    with OpenAIServer(answer_as_anyone) as server:
        config = build.load_config(None, SMALL + [
            f"output_dir={tmp_path}", "user.kind=llm", "judges.kind=llm", f"llm.base_url={server.base_url}",
            "llm.rpm=6000", "llm.price_input_per_mtok=0.15", "llm.price_output_per_mtok=0.60"])
        summary = build.build_trainer(config).train()
    [record] = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["phase"] == "ppo"]
    samples = 2 * 2 * 2  # conversations x turns x samples
    assert record["llm/profile_judge/calls"] == record["llm/response_judge/calls"] == samples
    assert record["llm/user/calls"] == 2 * 2  # one reply per conversation and turn
    for role in ("user", "profile_judge", "response_judge"):
        assert 0 < record[f"llm/{role}/p50_s"] <= record[f"llm/{role}/p90_s"] <= record[f"llm/{role}/p99_s"]
        assert record[f"llm/{role}/failures"] == 0 and record[f"llm/{role}/cache_hit_rate"] == 0.0
    assert record["llm/response_judge/prompt_tokens"] == 300 * samples
    assert record["llm/response_judge/cost_usd"] == pytest.approx((300 * 0.15 + 4 * 0.60) * samples / 1e6)
    # The summary's totals add the held-out evaluations before and after PPO to the iteration.
    assert summary["llm"]["llm/response_judge/calls"] > record["llm/response_judge/calls"]
    tags = set().union(*map(scalar_tags, (config.run_dir / "tensorboard").iterdir()))
    assert {f"ppo/llm/{role}/p90_s" for role in ("user", "profile_judge", "response_judge")} <= tags
    assert "ppo/llm/response_judge/cost_usd" in tags


def scalar_tags(path) -> set[str]:
    """The scalar tags of a TensorBoard event file (TFRecord framing: length, its CRC, the
    event, its CRC)."""
    data, at, tags = path.read_bytes(), 0, set()
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        tags.update(value.tag for value in event.summary.value)
        at += 12 + length + 4
    return tags


def test_the_evaluation_judges_on_its_own_endpoint_and_reports_its_llm_use(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".jax_cache"))  # keep this process's cache
    spec = importlib.util.spec_from_file_location("eval_launcher", REPO_ROOT / "launch" / "eval.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    policy_turn = format_turn([ProfileItem("Occupation", "nurse")], "Nice! Which ward do you work on?")
    with OpenAIServer(lambda request: policy_turn) as policy, OpenAIServer(answer_as_anyone) as training_judges, \
            OpenAIServer(answer_as_anyone) as eval_judge:
        status = launcher.main([
            "--policy", "openai:policy-model", "--base-url", policy.base_url, "--setting", "vanilla", "--turns", "2",
            "--users", "3", "--output", str(tmp_path), "--name", "api", "--no-progress", "judges.kind=llm",
            f"judges.llm.base_url={training_judges.base_url}", f"eval.judge.llm.base_url={eval_judge.base_url}",
            "eval.judge.llm.model=gpt-4o", "eval.judge.llm.price_input_per_mtok=2.5"])
    assert status == 0
    assert training_judges.requests == []  # the evaluation never asks the training judges
    assert {r["model"] for r in eval_judge.requests} == {"gpt-4o"} and len(eval_judge.requests) == 3 * 2
    totals = json.loads((tmp_path / "api_vanilla_llm.json").read_text())
    assert totals["llm/eval_judge/calls"] == 3 * 2 and totals["llm/eval_profile_judge/calls"] == 0
    assert totals["llm/eval_judge/cost_usd"] == pytest.approx(300 * 3 * 2 * 2.5 / 1e6)
