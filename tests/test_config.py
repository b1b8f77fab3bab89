"""YAML configs with dotted overrides, and errors that name the key and list what is accepted."""

import pytest

from rlpa_jax.config import REPO_ROOT, ConfigError, load_config


def test_every_shipped_config_loads():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_default_is_the_embedded_tiny_world():
    config = load_config()
    assert config.model.path is None and config.user.kind == "scripted" and config.judges.kind == "embedded"


def test_paper_recipe_in_the_3b_config():
    c = load_config(REPO_ROOT / "configs" / "qwen2.5-3b-8gpu.yaml")
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, 8, 1)
    assert (c.ppo.actor_lr, c.ppo.critic_lr, c.ppo.kl_coef, c.ppo.lam, c.ppo.gamma) == (5e-7, 9e-6, 0.01, 0.95, 1.0)
    assert (c.ppo.clip_eps, c.ppo.value_clip_eps, c.ppo.train_batch_size, c.rollout.samples_per_prompt) == (0.2, 0.2, 128, 4)
    assert c.rollout.conversations * c.rollout.max_rounds // 10 * 4 == 256  # 256 prompts per rollout
    assert c.model.compute_dtype == "bfloat16" and (c.ppo.adam_b1, c.ppo.adam_b2) == (0.9, 0.95)


def test_dotted_overrides_with_types():
    c = load_config(None, ["ppo.actor_lr=1e-6", "rollout.max_rounds=3", "model.tiny.hidden_size=64",
                           "data.switch_turn=2", "rollout.prompt_buckets=[64,128]", "logging.tensorboard=false",
                           "ppo.output_scale_lr=0.02"])
    assert c.ppo.actor_lr == 1e-6 and c.ppo.output_scale_lr == 0.02 and c.rollout.max_rounds == 3 and c.model.tiny.hidden_size == 64
    assert c.data.switch_turn == 2 and c.rollout.prompt_buckets == [64, 128] and c.logging.tensorboard is False


@pytest.mark.parametrize("override, message", [
    ("ppo.actor_rate=1", r"unknown key 'actor_rate' at ppo; valid keys: .*actor_lr"),
    ("nonsense=1", r"unknown key 'nonsense' at top level; valid keys: .*ppo"),
    ("ppo.actor_lr=fast", r"ppo.actor_lr: expected a number, got 'fast'"),
    ("ppo.advantage=td", r"ppo.advantage: 'td' is not one of \['gae', 'cross_turn', 'grpo'\]"),
    ("rollout.max_rounds=2.5", r"rollout.max_rounds: expected an integer"),
    ("ppo.actor_lr", r"expected key.path=value"),
    ("ppo.micro_batch_size=7", r"train_batch_size=32 must be a multiple of ppo.micro_batch_size=7"),
    ("rollout.eval_conversations=0", r"rollout.eval_conversations=0 must be >= 1"),
    ("ppo.credit=items", r"ppo.credit: 'items' is not one of \['turn', 'block', 'item'\]"),
    ("ppo.credit=item ppo.advantage=gae", r"ppo.credit=item needs ppo.advantage=grpo"),
    ("ppo.output_scale_lr=0", r"ppo.output_scale_lr must be > 0"),
    ("ppo.credit=item judges.kind=llm", r"ppo.credit=item needs judges.kind=embedded"),
])
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: {actor_lr: [1, 2}")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("ppo:\n  clip: 0.2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.ppo: unknown key 'clip'"):
        load_config(bad)
