"""The paper's 8-GPU config starts on 8 fake CPU devices: a Qwen2.5-release-shaped checkpoint
(tiny sizes), FSDP over 8, ALOE personas converted by an LLM, and an LLM user and judges behind
a real OpenAI-compatible server on 127.0.0.1. A user's 8-GPU run then fails only on what the
machine lacks, not on our code."""

import json
from pathlib import Path

import jax
from hf_reference import make_hf_model, write_release_shaped
from openai_server import OpenAIServer, Reply
from tiny_corpus import synthetic_corpus

from rlpa_jax.app.build import build_trainer
from rlpa_jax.config.loading import load_config
from rlpa_jax.model.tokenizer import train_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout


def world_server(request: dict) -> Reply:
    """Answers as the persona converter (JSON), the judges (\\boxed{}), or the user (plain text)."""
    text = " ".join(m["content"] for m in request["messages"])
    if request.get("response_format", {}).get("type") == "json_object":
        return Reply(content=json.dumps({"Age": "34", "Occupation": "graphic designer", "Interests": ["hiking", "yoga"]}))
    if "boxed" in text:
        return Reply(content="The reply is fine. \\boxed{1}")
    return Reply(content="I spend my weekends hiking, and I work as a graphic designer.")


def test_paper_config_starts_on_eight_fake_devices(tmp_path, aloe_dir):
    assert len(jax.devices()) == 8
    model_dir = write_release_shaped(make_hf_model(vocab_size=512, rope_theta=1e6), tmp_path / "Qwen2.5-3B-Instruct")
    train_tiny_tokenizer(model_dir, synthetic_corpus(), vocab_size=512)
    with OpenAIServer(world_server) as server:
        endpoint = [f"user.llm.base_url={server.base_url}", f"judges.llm.base_url={server.base_url}",
                    "user.llm.cache_path=null", "judges.llm.cache_path=null"]
        config = load_config(REPO_ROOT / "configs" / "qwen2.5-3b-8gpu.yaml", endpoint + [
            f"model.path={model_dir}", f"output_dir={tmp_path}", f"data.aloe_dir={aloe_dir}", "data.num_personas=8",
            "rollout.conversations=8", "rollout.max_rounds=2", "rollout.max_new_tokens=8", "rollout.prompt_buckets=[128,256]",
            "rollout.system_prompt=policy_system_tiny",
            "ppo.iterations=1", "ppo.train_batch_size=64", "ppo.micro_batch_size=8", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.export_hf=false"])
        assert (config.mesh.fsdp, config.model.compute_dtype, config.ppo.actor_lr) == (8, "bfloat16", 5e-7)
        run = build_trainer(config)
        state = run.initial_state()
        q = state.actor.params["layers"]["attn"]["q_kernel"]
        assert q.sharding.spec[1] == "fsdp" and len(q.sharding.device_set) == 8
        state, metrics = run.iteration(state)
    # schedule: turn — one turn of each of the pool's 8 conversations, 4 samples each
    assert metrics["samples"] == 8 * 4 and metrics["invalid_samples"] == 0 and metrics["pool_turn"] == 1
    kinds = {"json" if r.get("response_format") else "judge" if "boxed" in str(r["messages"]) else "user" for r in server.requests}
    assert {"json", "user"} <= kinds  # persona conversion and the simulated user went over HTTP
    assert all(map(lambda v: v == v, (metrics["loss_mean"], metrics["critic_loss_mean"])))  # finite, not NaN
